"""Forward kernel: per-token streamed softmax statistics, logits only on chip.

Grid: (token blocks over the *compacted* valid rows, vocabulary splits). Each program streams
its share of the vocabulary in BLOCK_V tiles and keeps, per row, an online max ``m``,
``s_excl = sum over non-target columns of exp(z - m)`` and the target logit ``z_t`` (and for
entropy ``s_all`` and ``t = sum exp(z - m) (z - m)``). Excluding the target from the sum is
what gives ``logp`` and ``1 - p`` full precision for confident tokens (``engine.finish_logprob``).
The splits' partial results, stored at each row's own index, are merged by ``engine.merge_partials``
in O(splits x N) floats.

With ``LOGITS_GIVEN`` (the "cublas" forward plan, ``launch.py``) the kernel is the epilogue of a
cuBLAS product: it reads the raw logits of columns ``[col_begin, col_end)`` for every row from
``z_ptr`` (``[N, col_end - col_begin]``) instead of computing them, and its splits are stored
from ``split_base`` on, one launch per vocabulary chunk.
"""

import triton
import triton.language as tl

from .common import given_logits_tile, logits_tile


# H and the strides are specialized on divisibility by 16 (vector loads, pipelined loops; see
# the backward kernel); the sizes that only bound rows and columns are not.
@triton.jit(do_not_specialize=["N", "col_begin", "col_end", "cols_per_split", "split_base"])
def gft_forward_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    order_ptr,
    n_active_ptr,
    m_part_ptr,
    s_excl_part_ptr,
    zt_part_ptr,
    s_all_part_ptr,
    t_part_ptr,
    z_ptr,
    # sizes and strides
    N,
    H,
    stride_hn,
    stride_wv,
    stride_z,
    col_begin,
    col_end,
    cols_per_split,
    split_base,
    # scalars
    inv_temp,
    softcap,
    # features and tiles
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    LOGITS_GIVEN: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_active = tl.load(n_active_ptr)
    if pid_m * BLOCK_M >= n_active:  # only ignored rows left: nothing to compute
        return
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pos < n_active
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)

    tgt_local = (tgt - col_begin).to(tl.int32)  # -1 - col_begin for rows without a target
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_excl = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = col_begin + pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, col_end)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        if LOGITS_GIVEN:
            # splits start at multiples of BLOCK_V within the chunk: said, so the loads vectorize
            local0 = tl.multiple_of(v0 - col_begin, BLOCK_V)
            z = given_logits_tile(
                z_ptr,
                rows,
                row_mask,
                local0 + tl.arange(0, BLOCK_V),
                col_mask,
                stride_z,
                b_ptr,
                cols,
                inv_temp,
                softcap,
                HAS_BIAS,
                HAS_SOFTCAP,
            )
        else:
            z = logits_tile(
                h_ptr,
                w_ptr,
                b_ptr,
                rows,
                row_mask,
                cols,
                col_mask,
                H,
                stride_hn,
                stride_wv,
                inv_temp,
                softcap,
                HAS_BIAS,
                HAS_SOFTCAP,
                UPCAST,
                INPUT_PRECISION,
                BLOCK_M,
                BLOCK_V,
                BLOCK_K,
            )
        if LOGITS_GIVEN:  # int32 compares: int64 ones over the whole tile spill its registers
            is_target = (local0 + tl.arange(0, BLOCK_V))[None, :] == tgt_local[:, None]
        else:
            is_target = cols[None, :] == tgt[:, None]
        z_t += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf); every split has >= 1 column
        e = tl.exp(z - m_new[:, None])
        s_excl = s_excl * alpha + tl.sum(tl.where(is_target, 0.0, e), axis=1)
        if WITH_ENTROPY:
            # re-centre t from m to m_new: sum e_old (z - m_new) = t + (m - m_new) s_all
            shift = (tl.where(s_all > 0.0, m, m_new) - m_new) * s_all  # no -inf * 0 on the first tile
            z_centred = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(e * z_centred, axis=1)
            s_all = s_all * alpha + tl.sum(e, axis=1)
        m = m_new

    out = (split_base + pid_s) * N + rows  # row order: the merge needs no permutation (rows past n_active masked)
    tl.store(m_part_ptr + out, m, mask=row_mask)
    tl.store(s_excl_part_ptr + out, s_excl, mask=row_mask)
    tl.store(zt_part_ptr + out, z_t, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(s_all_part_ptr + out, s_all, mask=row_mask)
        tl.store(t_part_ptr + out, t, mask=row_mask)
