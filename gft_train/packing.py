"""Packed (padding-free) micro-batches: the sequences of a micro-batch as one row.

A padded micro-batch ``[B, T]`` spends compute on ``B x T - sum(lengths)`` pad tokens; packed,
the same sequences are concatenated into ``[1, sum(lengths)]`` with ``position_ids`` restarting
at 0 at each sequence start, as transformers' ``DataCollatorWithFlattening`` builds them.

How the model keeps the sequences apart: with ``attention_mask=None`` and no cache,
transformers (>= 4.53; read in 5.x ``masking_utils.find_packed_sequence_indices``) reads a
sequence start wherever the position ids do not increase by 1, and its mask functions
(``create_causal_mask``, the sliding-window and chunked ones) add a block-diagonal term, so the
eager, sdpa and flex implementations attend within each sequence; flash-attention reads the same
position ids as ``cu_seqlens`` (``modeling_flash_attention_utils._is_packed_sequence``). A model
that builds its mask another way, ignores ``position_ids``, or carries a recurrent state along
the row (SSMs, RWKV, xLSTM, ...) would silently mix the sequences: ``check_packing`` runs the
model on two sequences packed and apart and refuses it when they differ.

Targets are shifted per sequence: the last token of a sequence predicts nothing (it would
predict the next sequence's first token), and each token's advantage is its sequence's. The
loss op takes the row with its ``seq_ids`` (its packed layout), so the "seq-" loss aggregations
count each sequence, inside the op, as they count the rows of a padded batch.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch

from gft_kernels.options import IGNORE_INDEX

from .lm import Batch


@dataclass
class PackedBatch:
    """The sequences of a ``Batch`` concatenated into one row (padding dropped)."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], 0, 1, ... restarting at each sequence
    labels: torch.Tensor  # [1, N], already shifted: the token position t predicts (IGNORE_INDEX
    # on prompt tokens and on each sequence's last position)
    adv: torch.Tensor  # [1, N], each token's sequence's advantage
    seq_ids: torch.Tensor  # [1, N], the index of each token's sequence in the micro-batch
    n_cut: int = 0

    attention_mask = None  # the model reads the sequence boundaries from position_ids

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            *(x.to(device) for x in (self.input_ids, self.position_ids, self.labels, self.adv, self.seq_ids)),
            n_cut=self.n_cut,
        )

    def masked(self) -> PackedBatch:
        """The same row with every target ignored and no advantage (adds nothing)."""
        return PackedBatch(
            self.input_ids,
            self.position_ids,
            torch.full_like(self.labels, IGNORE_INDEX),
            torch.zeros_like(self.adv),
            self.seq_ids,
            n_cut=0,
        )

    @property
    def n_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_seqs(self) -> int:
        """Sequences with at least one token that counts."""
        return int(self.seq_ids[self.labels != IGNORE_INDEX].unique().numel())


def pack(batch: Batch) -> PackedBatch:
    """A right-padded ``Batch`` as one row of its sequences (the same tokens, labels, advantages)."""
    ids, pos, labels, adv, seq = [], [], [], [], []
    for r, n in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        ids.append(batch.input_ids[r, :n])
        pos.append(torch.arange(n))
        # position t predicts token t + 1 of the same sequence; the last one predicts nothing
        labels.append(torch.cat([batch.labels[r, 1:n], torch.tensor([IGNORE_INDEX])]))
        adv.append(batch.adv[r].expand(n))
        seq.append(torch.full((n,), r))
    return PackedBatch(*(torch.cat(x).unsqueeze(0) for x in (ids, pos, labels, adv, seq)), n_cut=batch.n_cut)


# ---- the probe --------------------------------------------------------------------------
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def attention_name(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "none")


def _takes_position_ids(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_packing(model, lengths: tuple[int, ...] = (8, 8)) -> None:
    """Raises ``ValueError`` (one line: the architecture, its attention implementation, what it
    does) unless the model gives each sequence of a packed row the same head input as that
    sequence run alone. Probed once per model (the verdict is cached), in eval mode, no grad."""
    from gft_kernels.models import head_input
    from gft_kernels.models.transforms import arch_name

    arch, attn = arch_name(model), attention_name(model)
    known = _VERDICTS.get(model, {})
    if attn in known:  # (per implementation: set_attn_implementation may change it)
        if known[attn] is not None:
            raise known[attn]
        return
    prefix = f"packed batches (--packed): {arch} with attn_implementation={attn!r}"
    error = None
    if not _takes_position_ids(model):
        error = ValueError(
            f"{prefix}: its forward takes no position_ids, so it cannot tell the packed sequences "
            "apart; train without --packed"
        )
    else:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        g = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        seqs = [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                apart = [head_input(model, s[None], torch.ones_like(s[None])) for s in seqs]
                row = torch.cat(seqs)[None]
                pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
                packed = head_input(model, row, None, position_ids=pos)
            diff = (packed[0] - torch.cat([a[0] for a in apart])).abs().max().item()
            scale = max(max(a.abs().max().item() for a in apart), 1.0)
            # float32 agreement even in float64: models compute their rotary tables in float32
            # (2e-7 seen); a leak across sequences is orders larger (1e-3 to 1 on the tiny models)
            tol = 5e-2 if packed.dtype in (torch.float16, torch.bfloat16) else 1e-4
            if not diff <= tol * scale:
                error = ValueError(
                    f"{prefix}: a packed row's sequences see each other (their outputs differ from "
                    f"the sequences run apart by up to {diff:.3g}): this model or attention "
                    "implementation does not keep packed sequences apart; train without --packed"
                    + (
                        ""
                        if attention_name(model) in ("eager", "sdpa", "flash_attention_2")
                        else ", or pick an attention implementation that reads position_ids "
                        "(--attn-implementation sdpa, eager or flash_attention_2; transformers >= 4.53)"
                    )
                )
        except Exception as e:  # e.g. a model that refuses the row's length: refused, with its reason
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            error = ValueError(
                f"{prefix}: its forward fails on a packed row ({type(e).__name__}: {first}); train without --packed"
            )
        finally:
            model.train(was_training)
    _VERDICTS.setdefault(model, {})[attn] = error
    if error is not None:
        raise error
