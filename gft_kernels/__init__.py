"""gft_kernels: the fused Group Fine-Tuning loss.

    loss = gft_kernels.gft_loss(hidden, lm_head, targets, adv, tau=0.7)
    loss = gft_kernels.causal_lm_gft_loss(model, input_ids, attention_mask, labels, adv, tau=0.7)
    gft_kernels.patch(model)   # model(input_ids, labels=..., advantages=..., tau=...).loss

See ``api.gft_loss`` for the arguments and the exact PyTorch equivalent, ``head.py`` for the
loss math every backend shares, ``reference.py`` for the specification, ``torch_backend.py``
for the chunked CPU path and ``triton_ops/`` for the fused kernels.
"""
from .api import GFTLoss, gft_loss
from .head import GFTStats, dcr_coefficient
from .models import UnsupportedModelError, causal_lm_gft_loss, check_model, patch, unpatch

__all__ = ["gft_loss", "GFTLoss", "GFTStats", "dcr_coefficient", "causal_lm_gft_loss", "patch", "unpatch",
           "check_model", "UnsupportedModelError"]
__version__ = "0.1.0"
