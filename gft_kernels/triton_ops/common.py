"""Pieces shared by the forward and backward kernels."""

import triton
import triton.language as tl


@triton.jit
def logits_tile(
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
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """z[BLOCK_M, BLOCK_V] = softcap((h[rows] @ W[cols]^T + b[cols]) * inv_temp), fp32.

    ``rows``/``cols`` are int64 so row * stride never overflows. Out-of-range entries are
    computed from zeros; callers mask them.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_row = h_ptr + rows[:, None] * stride_hn
    w_col = w_ptr + cols[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(h_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_col + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter miscomputes bf16 tl.dot; exact products either way
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return finish_logits(acc, b_ptr, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def given_logits_tile(
    z_ptr,
    z_rows,
    row_mask,
    z_cols,
    col_mask,
    stride_z,
    b_ptr,
    cols,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``logits_tile`` of the cuBLAS plans: the product ``h @ W^T`` is given (a chunk written by
    cuBLAS, fp32 or the input dtype), at rows ``z_rows`` and columns ``z_cols`` of ``z_ptr``
    (int64); the bias, temperature and softcap are applied here, in fp32."""
    mask = row_mask[:, None] & col_mask[None, :]
    acc = tl.load(z_ptr + z_rows[:, None] * stride_z + z_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return finish_logits(acc, b_ptr, cols, col_mask, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def finish_logits(acc, b_ptr, cols, col_mask, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """softcap((acc + b[cols]) * inv_temp), fp32."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    if HAS_SOFTCAP:
        # softcap * tanh(z / softcap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (stable at both ends)
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def dlogits_tile(
    z,
    mask,
    cols,
    tgt,
    m,
    log_s,
    q,
    g,
    ge,
    ent,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
):
    """dL/d(h W^T + b) of a recomputed tile, fp32, 0 outside ``mask`` (see backward.py).

    ``p = exp((z - m) - log_s)`` from the forward's two-part log-sum-exp; at the target column
    ``1 - p`` is the forward's exact ``q`` (``1 - exp(.)`` would cancel for confident tokens).
    With an entropy term (``ge = dL/dH`` per row, ``ent = H``), each column also gets
    ``ge * dH/dz_j = -ge p_j (log p_j + H)``.
    """
    log_p = tl.minimum((z - m[:, None]) - log_s[:, None], 0.0)
    p = tl.where(mask, tl.exp(log_p), 0.0)
    dz = g[:, None] * tl.where(cols[None, :] == tgt[:, None], q[:, None], -p)
    if HAS_ENT_GRAD:
        dz -= ge[:, None] * p * (log_p + ent[:, None])
    if HAS_SOFTCAP:
        cap = z / softcap
        dz = dz * (1.0 - cap * cap)
    return tl.where(mask, dz * inv_temp, 0.0)
