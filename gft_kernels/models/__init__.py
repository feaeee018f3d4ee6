"""From a transformers causal LM to the GFT loss, with no ``[tokens x vocab]`` logits.

Two entry points:

- ``causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau)``: the functional op;
  ``causal_lm_logprobs(model, input_ids, attention_mask, labels)``: the per-token log-probs.
- ``patch(model)``: the model's own ``forward(input_ids, labels=..., advantages=..., tau=...,
  num_items_in_batch=...)`` returns the GFT loss (the model's own loss when there are no
  advantages and ``tau=0``), like Liger's ``apply_liger_kernel_to_*`` or CCE's ``cce_patch``.

How the hidden states are found: the model's own forward runs until it calls its output
embedding (``model.get_output_embeddings()``, a linear layer); a forward pre-hook takes the
layer's input and stops the forward there. So whatever the model does before its head (a
final norm, a rescaling of the hidden state, a prediction transform with its own parameters)
is part of the captured input, with its autograd graph, and the head's product is never made.
Under ``torch.compile``, which does not trace that hook, the model's backbone (``base_model``) is
called instead, for models whose backbone output the probe saw to be exactly the head's input.

What comes after the head's product (logit scales and multipliers, final softcaps, a
vocabulary cut) is read from a table of known configuration fields (``logits_transform``) and
checked once per model by a probe (``check_model``): on a few tokens the model's own
``model(...).logits`` are compared with the transform applied to the head's product, at the
model's natural logits and at logits amplified to about 200 (where a cap shows). A model the
table does not describe exactly is refused with ``UnsupportedModelError`` (a
``NotImplementedError``) naming the architecture and what differs: never a silently different
loss.

The package, apart from the kernel's files: ``transforms.py`` (the table and the head),
``probe.py`` (the head's input and ``check_model``), ``loss.py`` (``causal_lm_gft_loss``),
``logprobs.py`` (``causal_lm_logprobs``),
``patching.py`` (``patch`` / ``unpatch``).
"""

from .logprobs import causal_lm_logprobs
from .loss import causal_lm_gft_loss
from .patching import patch, unpatch
from .probe import PROBE_AMPLITUDE, check_model, head_input
from .transforms import LogitsTransform, UnsupportedModelError, logits_transform

__all__ = [
    "causal_lm_gft_loss",
    "causal_lm_logprobs",
    "patch",
    "unpatch",
    "check_model",
    "head_input",
    "logits_transform",
    "LogitsTransform",
    "UnsupportedModelError",
    "PROBE_AMPLITUDE",
]
