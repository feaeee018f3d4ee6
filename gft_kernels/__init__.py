"""gft_kernels: the fused Group Fine-Tuning loss.

    loss = gft_kernels.gft_loss(hidden, lm_head, targets, adv, tau=0.7)

See ``api.gft_loss`` for the arguments and the exact PyTorch equivalent, ``head.py`` for the
loss math every backend shares, ``reference.py`` for the specification, ``torch_backend.py``
for the chunked CPU path and ``triton_ops/`` for the fused kernels.
"""
from .api import GFTLoss, gft_loss
from .head import GFTStats, dcr_coefficient

__all__ = ["gft_loss", "GFTLoss", "GFTStats", "dcr_coefficient"]
__version__ = "0.1.0"
