"""Packed (padding-free) micro-batches: the sequences of a micro-batch laid out in rows.

A padded micro-batch ``[B, T]`` spends compute on ``B x T - sum(lengths)`` pad tokens; packed,
the same sequences are concatenated with ``position_ids`` restarting at 0 at each sequence
start, as transformers' ``DataCollatorWithFlattening`` builds them. Two layouts:

- rows (``pack(batch, rows=True)``, the trainer's for eager, sdpa, flex and any attention that
  builds a mask): the sequences go into ``R`` rows by best-fit decreasing (longest first, each
  into the row whose free space fits it most tightly, a new row when none does), each row at
  most as long as the micro-batch's longest sequence (``T``, at most ``max_length``: ``encode``
  cut it), the rows right-padded to the longest row. So ``R <= B`` and every row is ``<= T``
  tokens: never more token slots nor more attention scores than the padded ``[B, T]``, while a
  dense block-diagonal mask over one row of every token costs ``sum(lengths)^2`` scores.
  A row's padding continues its last sequence's positions and has no targets.
- one row (``pack(batch)``, the trainer's for flash-attention): ``[1, sum(lengths)]``; flash's
  varlen kernels read the boundaries as ``cu_seqlens`` and cost ``sum(length^2)``, and
  transformers reads packed position ids for flash only in a batch of one row.

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

import bisect
import inspect
import weakref
from dataclasses import dataclass

import torch

from gft_kernels.options import IGNORE_INDEX

from .lm import Batch


@dataclass
class PackedBatch:
    """The sequences of a ``Batch`` packed into rows (one row, or best-fit rows and their padding)."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L] (or [1, L] when every row holds one sequence), 0, 1, ...
    # restarting at each sequence
    labels: torch.Tensor  # [R, L], already shifted: the token position t predicts (IGNORE_INDEX
    # on prompt tokens, on each sequence's last position and on a row's padding)
    adv: torch.Tensor  # [R, L], each token's sequence's advantage (0 on a row's padding)
    seq_ids: torch.Tensor  # [R, L], the index of each token's sequence in the micro-batch
    in_sequence: torch.Tensor  # [R, L] bool, False on a row's padding
    n_cut: int = 0

    attention_mask = None  # the model reads the sequence boundaries from position_ids

    def _tensors(self) -> tuple:
        return (self.input_ids, self.position_ids, self.labels, self.adv, self.seq_ids, self.in_sequence)

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(x.to(device) for x in self._tensors()), n_cut=self.n_cut)

    def masked(self) -> PackedBatch:
        """The same rows with every target ignored and no advantage (adds nothing)."""
        return PackedBatch(
            self.input_ids,
            self.position_ids,
            torch.full_like(self.labels, IGNORE_INDEX),
            torch.zeros_like(self.adv),
            self.seq_ids,
            self.in_sequence,
            n_cut=0,
        )

    @property
    def n_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_seqs(self) -> int:
        """Sequences with at least one token that counts."""
        return int(self.seq_ids[self.labels != IGNORE_INDEX].unique().numel())

    @property
    def n_tokens(self) -> int:
        """The sequences' tokens (a row's padding not counted)."""
        return int(self.in_sequence.sum())


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` tokens: the indices of ``lengths`` in each. Longest first
    (ties in index order), each into the bin whose free space fits it most tightly (ties: the bin
    opened first), a new bin when none fits."""
    bad = [n for n in lengths if not 0 < n <= capacity]
    if bad:
        raise ValueError(f"lengths must be in [1, capacity={capacity}], got {bad[:8]}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space > n:
            bisect.insort(free, (space - n, b))
    return bins


def pack(batch: Batch, rows: bool = False) -> PackedBatch:
    """A right-padded ``Batch`` packed (the same tokens, labels, advantages): one row of all its
    sequences, or with ``rows`` best-fit decreasing rows, each at most as long as the longest
    sequence (module docstring)."""
    lengths = batch.attention_mask.sum(dim=1)
    n_list = lengths.tolist()
    bins = best_fit_decreasing(n_list, max(n_list)) if rows else [list(range(len(n_list)))]
    order = torch.tensor([r for b in bins for r in b])  # the sequences, row after row
    row_of = torch.repeat_interleave(torch.arange(len(bins)), torch.tensor([len(b) for b in bins]))
    n = lengths[order]
    fill = torch.zeros(len(bins), dtype=n.dtype).index_add_(0, row_of, n)  # each row's tokens
    ends = n.cumsum(0)
    row_start = ends - n - torch.cat([fill.new_zeros(1), fill.cumsum(0)[:-1]])[row_of]  # (in its row)
    # each token: its sequence, its position in it, its place in the rows
    seq = torch.repeat_interleave(order, n)
    pos = torch.arange(int(ends[-1])) - torch.repeat_interleave(ends - n, n)
    row = torch.repeat_interleave(row_of, n)
    col = torch.repeat_interleave(row_start, n) + pos
    shape = (len(bins), int(fill.max()))
    # a row's padding goes on from its last sequence (its positions continue), with no target, no
    # advantage and that sequence's seq_id; its ids the padded batch's pad where it has one. Any id
    # and position would do: no target reads it and the sequences before it cannot attend to it;
    # continued, a row of one sequence has positions 0, 1, ... as a padded row does
    pad_id = batch.input_ids[batch.attention_mask == 0][:1].tolist() or [0]
    columns = torch.arange(shape[1]).expand(shape)
    out_ids = torch.full(shape, pad_id[0], dtype=batch.input_ids.dtype)
    last_of_row = torch.tensor([len(b) for b in bins]).cumsum(0) - 1
    out_pos = columns - (fill - n[last_of_row])[:, None]
    out_labels = torch.full(shape, IGNORE_INDEX, dtype=batch.labels.dtype)
    out_adv = torch.zeros(shape, dtype=batch.adv.dtype)
    out_seq = order[last_of_row][:, None].expand(shape).clone()
    in_sequence = columns < fill[:, None]
    out_ids[row, col] = batch.input_ids[seq, pos]
    out_pos[row, col] = pos
    # position t predicts token t + 1 of the same sequence; the last one predicts nothing
    last = pos == n.repeat_interleave(n) - 1
    out_labels[row, col] = torch.where(
        last, IGNORE_INDEX, batch.labels[seq, (pos + 1).clamp_max(batch.labels.shape[1] - 1)]
    )
    out_adv[row, col] = batch.adv[seq]
    out_seq[row, col] = seq
    if bool((out_pos == columns).all()):  # one sequence a row: the positions of any row, broadcast
        out_pos = out_pos[:1].clone()  # (as a padded batch's; the model computes them once)
    return PackedBatch(out_ids, out_pos, out_labels, out_adv, out_seq, in_sequence, n_cut=batch.n_cut)


def packs_in_one_row(model) -> bool:
    """Whether the model's attention takes packed sequences in one row only: flash-attention's
    (transformers reads its packed position ids in a batch of one row, else attends causally
    along each row across its sequences). The others take best-fit rows."""
    return "flash" in attention_name(model)


# ---- the probe --------------------------------------------------------------------------
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def attention_name(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "none")


def _takes_position_ids(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_packing(model, lengths: tuple[int, ...] | None = None) -> None:
    """Raises ``ValueError`` (one line: the architecture, its attention implementation, what it
    does) unless the model gives each sequence of packed rows the same head input as that
    sequence run alone, in the layout the trainer packs for its attention (``packs_in_one_row``):
    one row, or best-fit rows (default lengths (16, 9, 6): a row of one sequence, and a row of two
    and its padding). Probed once per model (the verdict is cached), in eval mode, no grad."""
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
        one_row = packs_in_one_row(model)
        # rows: [16] and [9, 6] and a token of padding, longer than a tiny config's sliding window
        # or compression block (deepseek_v4's 8 kept rows of 8 apart and mixed longer ones)
        lengths = lengths or ((8, 8) if one_row else (16, 9, 6))
        g = torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        seqs = [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                apart = [head_input(model, s[None], torch.ones_like(s[None])) for s in seqs]
                rows = pack(_probe_batch(seqs), rows=not one_row).to(device)
                packed = head_input(model, rows.input_ids, None, position_ids=rows.position_ids)
                # each sequence's tokens, in the order of the rows (one sequence's are contiguous)
                order = rows.seq_ids[rows.in_sequence].unique_consecutive().tolist()
            diff = (packed[rows.in_sequence] - torch.cat([apart[r][0] for r in order])).abs().max().item()
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


def _probe_batch(seqs: list[torch.Tensor]) -> Batch:
    """The probe's sequences as a right-padded ``Batch`` on the CPU (every token a target)."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = x.cpu()
        mask[r, : len(x)] = 1
    return Batch(ids, mask, torch.where(mask.bool(), ids, IGNORE_INDEX), torch.zeros(len(seqs)))
