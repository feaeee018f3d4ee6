"""Backward kernels: recompute a logits tile and form dz, the gradient w.r.t. the logits.

Two designs (``launch.py`` chooses; ``LaunchOptions.backward_design``):

* ``"split"`` (``gft_dlogits_kernel``): per vocabulary chunk, write dz in the input dtype to an
  ``[active rows, Vc]`` buffer; two cuBLAS products then give dW[chunk] = dz^T h (written once)
  and dH += dz W[chunk] (fp32 accumulator). 4 matrix products in all, no atomics, deterministic
  (db too: each row block stores its column sums, which the launcher adds in a fixed order).
* ``"atomic"`` (``gft_backward_kernel``): the tile's products are added with fp32 atomics into
  dH, dW and db accumulators; bounded scratch at any size, at the cost of the atomics' traffic.
  The order of the atomic adds varies between runs: this design is not bitwise deterministic.

For a tile of rows (compacted: only rows with g != 0, so ignored and zero-advantage tokens cost
nothing) and vocabulary columns:

    z       = softcap((h W^T + b) / T)                  recomputed, fp32
    dL/dz   = g * (onehot(y) - exp((z - m) - log_s))    per docs/spec.md (lse = m + log_s); at the target column
                                                        g * q, with q = 1 - p from the forward
    dL/dz  += -g_H * p * (log p + H)                    with an entropy term (g_H = dL/dH per row)
    dz      = dL/dz * softcap'(.) / T                   gradient w.r.t. the raw logits h W^T + b
    dH[r]  += dz @ W[cols]        (COMPUTE_DH)
    dW[c]  += dz^T @ h[rows]      (COMPUTE_DW)
    db[c]  += sum_r dz            (COMPUTE_DB)

``dz`` is rounded to the input dtype before the two products (as naive PyTorch does); the
products accumulate in fp32 inside the tile and are added with fp32 atomics into fp32
accumulators, which the launcher keeps small by chunking (see launch.py).
"""

import triton
import triton.language as tl

from .common import dlogits_tile, given_logits_tile, logits_tile


# Triton specializes integers on divisibility by 16 (a few variants, not one per value). The
# hidden size and the strides must be: a mask along H that is constant per 16 elements is what
# lets the loads vectorize and the matmul loops pipeline (without it, no cp.async on sm_90; see
# benchmarks/kernel_resources.py). Offsets that change every launch are left out.
@triton.jit(do_not_specialize=["pos_begin", "n_pos", "col_begin", "n_cols"])
def gft_backward_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    m_ptr,
    log_s_ptr,
    q_ptr,
    g_ptr,
    ge_ptr,
    ent_ptr,
    order_ptr,
    n_active_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    # sizes and strides
    V,
    H,
    stride_hn,
    stride_wv,
    pos_begin,
    n_pos,
    col_begin,
    n_cols,
    # scalars
    inv_temp,
    softcap,
    # features and tiles
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    DH_BY_ROW: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr,
    STORES_ONLY: tl.constexpr,
):
    # Grouped order over a 1-D grid: consecutive programs cover GROUP_M row blocks x all column
    # blocks, column-major within the group. Programs running at the same time then add into
    # ~GROUP_M dH regions and ~(#SMs / GROUP_M) dW regions, instead of all of them into the same
    # dW rows (row-major order), where same-address atomics would serialize.
    pid = tl.program_id(0)
    n_pm = tl.cdiv(n_pos, BLOCK_M)
    n_pv = tl.cdiv(n_cols, BLOCK_V)
    per_group = GROUP_M * n_pv
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_pm - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    n_active = tl.load(n_active_ptr)
    first = pos_begin + pid_m * BLOCK_M
    if first >= n_active:  # every remaining row has g == 0: skipped entirely
        return
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row index within this chunk
    pos = pos_begin + local
    row_mask = (pos < n_active) & (local < n_pos)
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    q = tl.load(q_ptr + rows, mask=row_mask, other=0.0)
    ge = tl.load(ge_ptr + rows, mask=row_mask & HAS_ENT_GRAD, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask & HAS_ENT_GRAD, other=0.0)

    local_col = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column index within this chunk
    cols = (col_begin + local_col).to(tl.int64)
    col_mask = (local_col < n_cols) & (cols < V)
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
    mask = row_mask[:, None] & col_mask[None, :]
    dz = dlogits_tile(z, mask, cols, tgt, m, log_s, q, g, ge, ent, inv_temp, softcap, HAS_SOFTCAP, HAS_ENT_GRAD)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    if UPCAST:
        dz_in = dz
    else:
        dz_in = dz.to(h_ptr.dtype.element_ty)

    if COMPUTE_DH:
        if DH_BY_ROW:
            dh_row = dh_ptr + rows[:, None] * H
        else:
            dh_row = dh_ptr + local.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            w = tl.load(
                w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0
            )
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.dot(dz_in, w, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_H]
            if STORES_ONLY:  # wrong sums: only to time the products without the atomics' cost
                tl.store(dh_row + ks[None, :], part, mask=row_mask[:, None] & k_mask[None, :])
            else:
                tl.atomic_add(dh_row + ks[None, :], part, mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
    if COMPUTE_DW:
        dz_t = tl.trans(dz_in)
        dw_row = dw_ptr + local_col.to(tl.int64)[:, None] * H
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            h = tl.load(
                h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
            )
            if UPCAST:
                h = h.to(tl.float32)
            part = tl.dot(dz_t, h, input_precision=INPUT_PRECISION)  # [BLOCK_V, BLOCK_H]
            if STORES_ONLY:
                tl.store(dw_row + ks[None, :], part, mask=col_mask[:, None] & k_mask[None, :])
            else:
                tl.atomic_add(dw_row + ks[None, :], part, mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["n_pos", "col_begin", "n_cols"])
def gft_dlogits_kernel(
    # pointers
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    m_ptr,
    log_s_ptr,
    q_ptr,
    g_ptr,
    ge_ptr,
    ent_ptr,
    order_ptr,
    dz_ptr,
    db_ptr,
    z_ptr,
    # sizes and strides
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dz,
    stride_z,
    stride_db,
    n_pos,
    col_begin,
    n_cols,
    # scalars
    inv_temp,
    softcap,
    # features and tiles
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENT_GRAD: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    LOGITS_GIVEN: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dz[pos, c] for positions ``pos < n_pos`` (row ``order[pos]``) and columns
    ``col_begin + c``, ``c < n_cols``, rounded to dz's dtype (as naive PyTorch rounds its
    logits' gradient); row ``pid_m`` of db (fp32 ``[row blocks, n_cols]``) gets this row block's
    unrounded column sums (the launcher adds them up: no atomics, deterministic).

    ``LOGITS_GIVEN`` (the "cublas" backward plan): the raw logits ``h[order[pos]] @ W[cols]^T``
    are read from ``z_ptr`` at ``[pos, c]`` (a cuBLAS product) instead of computed; dz may be
    written over them (``dz_ptr == z_ptr``): each element is read before it is written, by the
    same program."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pos < n_pos
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    q = tl.load(q_ptr + rows, mask=row_mask, other=0.0)
    ge = tl.load(ge_ptr + rows, mask=row_mask & HAS_ENT_GRAD, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask & HAS_ENT_GRAD, other=0.0)
    local_col = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = (col_begin + local_col).to(tl.int64)
    col_mask = (local_col < n_cols) & (cols < V)
    if LOGITS_GIVEN:
        z = given_logits_tile(
            z_ptr,
            pos.to(tl.int64),
            row_mask,
            local_col.to(tl.int64),
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
    mask = row_mask[:, None] & col_mask[None, :]
    dz = dlogits_tile(z, mask, cols, tgt, m, log_s, q, g, ge, ent, inv_temp, softcap, HAS_SOFTCAP, HAS_ENT_GRAD)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_m.to(tl.int64) * stride_db + local_col, tl.sum(dz, axis=0), mask=col_mask)
    out = dz_ptr + pos.to(tl.int64)[:, None] * stride_dz + local_col[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mask)
