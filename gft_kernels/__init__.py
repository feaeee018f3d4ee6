"""gft_kernels: the fused Group Fine-Tuning loss.

    loss = gft_kernels.gft_loss(hidden, lm_head, targets, adv, tau=0.7)
    logp, entropy = gft_kernels.logprobs(hidden, lm_head, targets, return_entropy=True)
    loss = gft_kernels.causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau=0.7)
    gft_kernels.patch(model)   # model(input_ids, labels=..., advantages=..., tau=...).loss

See ``api.gft_loss`` for the arguments and the exact PyTorch equivalent, ``options.py`` for the
typed options, ``head.py`` for the loss math every backend shares, ``engine.py`` for the engine
contract, ``reference.py`` for the specification, ``torch_backend.py`` for the chunked CPU
engine and ``triton_ops/`` for the fused kernels; docs/architecture.md draws them.
"""

from .api import GFTLoss, TokenLogprobs, gft_loss, logprobs
from .head import GFTStats, dcr_coefficient
from .models import UnsupportedModelError, causal_lm_gft_loss, causal_lm_logprobs, check_model, patch, unpatch
from .options import IGNORE_INDEX, check_tau

__all__ = [
    "gft_loss",
    "GFTLoss",
    "logprobs",
    "TokenLogprobs",
    "causal_lm_logprobs",
    "GFTStats",
    "dcr_coefficient",
    "IGNORE_INDEX",
    "check_tau",
    "causal_lm_gft_loss",
    "patch",
    "unpatch",
    "check_model",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
