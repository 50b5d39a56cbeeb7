"""The Triton side of the fused adapter (adapter.py holds the op, its autograd, the torch path and the
reference; the algorithm and its rounding points are described there): the forward, the token-parallel
backward and the split-K reduction kernels, their autotune configs and launchers."""

from __future__ import annotations

import torch

from sak.kernels import dispatch
from sak.kernels.dispatch import SUM_COMBINE as _SUM
from sak.kernels.dispatch import tl, triton

SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
# kernels may only read constexpr globals
_SQRT1_2 = tl.constexpr(SQRT1_2) if tl is not None else SQRT1_2
_INV_SQRT_2PI = tl.constexpr(INV_SQRT_2PI) if tl is not None else INV_SQRT_2PI
MAX_BOTTLENECK = 256  # (BLOCK_M, R) fp32 tiles live in registers: wider bottlenecks would spill


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted by dispatch.launch for the current interpret mode)


def adapter_fwd_kernel(
    x_ptr,  # (M, C)
    z_ptr,  # (M, C), unused unless HAS_Z
    wd_ptr,  # (R, C)
    bd_ptr,  # (R,)
    wu_ptr,  # (C, R)
    bu_ptr,  # (C,)
    scale_ptr,  # (1,)
    out_ptr,  # (M, C)
    h_ptr,  # (M, R), written only if SAVE_H
    M,
    C,
    R,
    HAS_Z: tl.constexpr,
    SAVE_H: tl.constexpr,
    MM_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    in_dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    row_off = rows.to(tl.int64) * C
    rr = tl.arange(0, BLOCK_R)  # (BR,)
    r_ok = rr < R
    scale = tl.load(scale_ptr).to(tl.float32)

    # phase 1: h = u @ w_down.T + b_down, accumulated over C chunks
    h = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)  # (BC,)
        c_ok = cc < C
        tile_ok = row_ok[:, None] & c_ok[None, :]
        u = tl.load(x_ptr + row_off[:, None] + cc[None, :], mask=tile_ok, other=0.0)  # (BM, BC)
        if HAS_Z:
            z = tl.load(z_ptr + row_off[:, None] + cc[None, :], mask=tile_ok, other=0.0)
            u = (u.to(tl.float32) + z.to(tl.float32)).to(in_dtype)  # rounded like eager x + z
        wd_t = tl.load(wd_ptr + rr[None, :] * C + cc[:, None], mask=r_ok[None, :] & c_ok[:, None], other=0.0)
        u_mm = u.to(MM_DTYPE).to(DOT_DTYPE)  # autocast's cast of the matmul input
        h = tl.dot(u_mm, wd_t.to(DOT_DTYPE), h, input_precision=DOT_PRECISION)  # (BM, BR)
    h += tl.load(bd_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    h = h.to(MM_DTYPE).to(tl.float32)  # the linear's output dtype, as eager rounds it
    if SAVE_H:
        h_mask = row_ok[:, None] & r_ok[None, :]
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :], h.to(MM_DTYPE), mask=h_mask)
    # exact GELU of the rounded h, rounded again (eager runs GELU in the matmul dtype); padded R columns: 0
    a = (0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))).to(MM_DTYPE).to(DOT_DTYPE)  # (BM, BR)

    # phase 2: out = u + scale * (a @ w_up.T + b_up), one C chunk at a time
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        tile_ok = row_ok[:, None] & c_ok[None, :]
        wu_t = tl.load(wu_ptr + cc[None, :] * R + rr[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        y = tl.dot(a, wu_t.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BM, BC) fp32
        y += tl.load(bu_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        y = y.to(MM_DTYPE).to(tl.float32)  # the up linear's output, rounded as eager
        u = tl.load(x_ptr + row_off[:, None] + cc[None, :], mask=tile_ok, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + row_off[:, None] + cc[None, :], mask=tile_ok, other=0.0)
            u = (u.to(tl.float32) + z.to(tl.float32)).to(in_dtype)
        out = u.to(tl.float32) + scale * y
        tl.store(out_ptr + row_off[:, None] + cc[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def adapter_bwd_tokens_kernel(
    g_ptr,  # (M, C) grad of out, contiguous
    h_ptr,  # (M, R) saved pre-activation
    wd_ptr,  # (R, C)
    wu_ptr,  # (C, R)
    scale_ptr,  # (1,)
    du_ptr,  # (M, C) grad of u = grad of x and of z
    dh_ptr,  # (M, R) grad of h, input dtype
    gsum_ptr,  # (n_tiles, C) fp32 partial colsum(g)
    dhsum_ptr,  # (n_tiles, R) fp32 partial colsum(dh)
    dscale_ptr,  # (n_tiles,) fp32 partial sum(gelu(h) * (g @ w_up))
    M,
    C,
    R,
    MM_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    in_dtype = h_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    row_off = rows.to(tl.int64) * C
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    scale = tl.load(scale_ptr).to(tl.float32)

    # gw = g @ w_up over C chunks; the column sums of g ride along
    gw = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        g = tl.load(g_ptr + row_off[:, None] + cc[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        wu = tl.load(wu_ptr + cc[:, None] * R + rr[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        g_mm = g.to(MM_DTYPE).to(DOT_DTYPE)
        gw = tl.dot(g_mm, wu.to(DOT_DTYPE), gw, input_precision=DOT_PRECISION)  # (BM, BR)
        tl.store(gsum_ptr + pid * C + cc, tl.reduce(g.to(tl.float32), 0, _SUM), mask=c_ok)

    h_mask = row_ok[:, None] & r_ok[None, :]
    h_off = rows.to(tl.int64)[:, None] * R + rr[None, :]
    h = tl.load(h_ptr + h_off, mask=h_mask, other=0.0).to(tl.float32)  # (BM, BR)
    cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
    a = (h * cdf).to(in_dtype).to(tl.float32)  # the activation the forward fed to w_up
    tl.store(dscale_ptr + pid, tl.reduce(tl.reduce(a * gw, 1, _SUM), 0, _SUM))
    da = (scale * gw).to(MM_DTYPE).to(tl.float32)  # grad of gelu(h), in the dtype eager keeps it
    dh = da * (cdf + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI)  # zero on padded rows/cols
    tl.store(dhsum_ptr + pid * R + rr, tl.reduce(dh, 0, _SUM), mask=r_ok)
    dh_lp = dh.to(in_dtype)
    tl.store(dh_ptr + h_off, dh_lp, mask=h_mask)
    dh_lp = dh_lp.to(DOT_DTYPE)

    # du = g + dh @ w_down, one C chunk at a time (g re-read, L2 hit)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        tile_ok = row_ok[:, None] & c_ok[None, :]
        wd = tl.load(wd_ptr + rr[:, None] * C + cc[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        du = tl.dot(dh_lp, wd.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BM, BC)
        du = du.to(MM_DTYPE).to(tl.float32)  # grad of the down linear's input, rounded as eager
        g = tl.load(g_ptr + row_off[:, None] + cc[None, :], mask=tile_ok, other=0.0)
        du += g.to(tl.float32)
        tl.store(du_ptr + row_off[:, None] + cc[None, :], du.to(du_ptr.dtype.element_ty), mask=tile_ok)


def token_reduce_kernel(
    a_ptr,  # (M, NI)
    b_ptr,  # (M, NJ)
    b2_ptr,  # (M, NJ), added to b if HAS_B2
    out_ptr,  # (n_splits, NI, NJ) fp32 partials of a.T @ f(b)
    M,
    NI,
    NJ,
    tokens_per_split,
    GELU_B: tl.constexpr,
    HAS_B2: tl.constexpr,
    MM_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    in_dtype = b_ptr.dtype.element_ty
    ii = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # (BI,)
    jj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BJ,)
    split = tl.program_id(2)
    i_ok = ii < NI
    j_ok = jj < NJ
    k_start = split * tokens_per_split
    k_end = tl.minimum(k_start + tokens_per_split, M)
    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_ok = kk < k_end
        kk64 = kk.to(tl.int64)
        a = tl.load(a_ptr + kk64[:, None] * NI + ii[None, :], mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & j_ok[None, :]
        b = tl.load(b_ptr + kk64[:, None] * NJ + jj[None, :], mask=b_mask, other=0.0)  # (BK, BJ)
        if HAS_B2:
            b2 = tl.load(b2_ptr + kk64[:, None] * NJ + jj[None, :], mask=b_mask, other=0.0)
            b = (b.to(tl.float32) + b2.to(tl.float32)).to(in_dtype)
        if GELU_B:
            bf = b.to(tl.float32)
            b = (0.5 * bf * (1.0 + tl.erf(bf * _SQRT1_2))).to(in_dtype)
        a_mm = a.to(MM_DTYPE).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(a_mm), b.to(MM_DTYPE).to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    out = out_ptr + split.to(tl.int64) * NI * NJ + ii[:, None] * NJ + jj[None, :]
    tl.store(out, acc, mask=i_ok[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# launchers


def kernel_configs(kind: str, dtype: torch.dtype) -> list:
    """Launch configs per kernel and matmul dtype: one small config under the interpreter, a tuning set on GPU.

    The GPU sets hold only configs with no register spills when compiled for sm_90 as the runtime specialises
    the real launch (128 x 577 tokens, C = 768 and 1024, BLOCK_R = 256), for x in the matmul dtype and for
    fp32 x under autocast (`ptxas -v`; the slow test `test_every_gpu_config_compiles_for_h100_without_spills`
    keeps it so). fp32 operands (IEEE dots) need half the tile of 16-bit ones.
    """
    C = triton.Config
    if dispatch.interpreting():
        return {"fwd": [C({"BLOCK_M": 32, "BLOCK_C": 64})], "bwd": [C({"BLOCK_C": 64})], "reduce": [C({})]}[
            kind
        ]
    if dtype == torch.float32:
        return {
            "fwd": [
                C({"BLOCK_M": 32, "BLOCK_C": 32}, num_warps=8, num_stages=2),
                C({"BLOCK_M": 64, "BLOCK_C": 16}, num_warps=8, num_stages=3),
                C({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=16, num_stages=2),
            ],
            "bwd": [
                C({"BLOCK_C": 16}, num_warps=8, num_stages=3),
                C({"BLOCK_C": 32}, num_warps=8, num_stages=2),
            ],
            "reduce": [C({}, num_warps=8, num_stages=3)],
        }[kind]
    return {
        "fwd": [  # 4 warps spill at BLOCK_M = 64
            C({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
            C({"BLOCK_M": 64, "BLOCK_C": 64}, num_warps=8, num_stages=3),
            C({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=8, num_stages=2),
            C({"BLOCK_M": 32, "BLOCK_C": 64}, num_warps=8, num_stages=3),
        ],
        "bwd": [  # BLOCK_M = 32 (bwd_block_m): every 64-token tile spilled, whatever the warps
            C({"BLOCK_C": 32}, num_warps=8, num_stages=3),
            C({"BLOCK_C": 32}, num_warps=8, num_stages=2),
            C({"BLOCK_C": 64}, num_warps=8, num_stages=3),
            C({"BLOCK_C": 16}, num_warps=8, num_stages=3),
        ],
        "reduce": [
            C({}, num_warps=8, num_stages=3),
            C({}, num_warps=4, num_stages=3),
            C({}, num_warps=4, num_stages=4),
        ],
    }[kind]


def bottleneck_block(R: int) -> int:
    if R > MAX_BOTTLENECK:
        raise ValueError(
            f"fused_adapter: bottleneck {R} > {MAX_BOTTLENECK} is not supported by the Triton path"
        )
    return max(16, triton.next_power_of_2(R))


def bwd_block_m(dtype: torch.dtype) -> int:
    """Tokens per backward tile, fixed (not tuned): it sizes the per-tile partial-sum buffers. 32 for every
    dtype: (64, 256) fp32 tiles of gw, h and dh spill registers on sm_90 at every warp count tried."""
    return 32


def fwd_triton(x, z, w_down, b_down, w_up, b_up, scale, save_h: bool):
    M, C = x.shape  # (M, C)
    R = w_down.shape[0]
    mm = w_down.dtype  # matmul operand dtype: x's, or the autocast dtype
    block_r = bottleneck_block(R)
    for cfg in kernel_configs("fwd", mm):
        dispatch.assert_dot_dims(
            BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_C=cfg.kwargs["BLOCK_C"], BLOCK_R=block_r
        )
    out = dispatch.new_buffer((M, C), x.dtype, x.device)
    h = dispatch.new_buffer((M, R) if save_h else (0,), mm, x.device)
    if M == 0:
        return out, h
    dispatch.launch(
        adapter_fwd_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        x, x if z is None else z, w_down, b_down, w_up, b_up, scale, out, h, M, C, R,
        configs=kernel_configs("fwd", mm),
        key=("C", "R"),
        HAS_Z=z is not None,
        SAVE_H=save_h,
        MM_DTYPE=dispatch.tl_dtype(mm),
        DOT_DTYPE=dispatch.dot_dtype(mm),
        DOT_PRECISION=dispatch.dot_precision(mm),
        BLOCK_R=block_r,
    )  # fmt: skip
    return out, h


def token_reduce(
    a: torch.Tensor, b: torch.Tensor, mm: torch.dtype, b2: torch.Tensor | None = None, gelu_b: bool = False
):
    """fp32 (NI, NJ) = a.T @ f(b) over M tokens; a (M, NI), b (M, NJ); f adds b2 and/or applies GELU; both
    operands rounded to the matmul dtype `mm`."""
    M, NI = a.shape
    NJ = b.shape[1]
    block_i, block_j, block_k = reduce_blocks(mm)
    dispatch.assert_dot_dims(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k)
    tiles = triton.cdiv(NI, block_i) * triton.cdiv(NJ, block_j)
    # enough splits of the token axis to give every SM a few programs
    n_splits = max(1, min(triton.cdiv(4 * dispatch.num_sms(a.device), tiles), triton.cdiv(M, block_k)))
    tokens_per_split = triton.cdiv(triton.cdiv(M, n_splits), block_k) * block_k
    n_splits = triton.cdiv(M, tokens_per_split)
    partial = dispatch.new_buffer((n_splits, NI, NJ), torch.float32, a.device)
    dispatch.launch(
        token_reduce_kernel,
        lambda meta: (triton.cdiv(NI, block_i), triton.cdiv(NJ, block_j), n_splits),
        a, b, b if b2 is None else b2, partial, M, NI, NJ, tokens_per_split,
        configs=kernel_configs("reduce", mm),
        key=("NI", "NJ"),
        GELU_B=gelu_b,
        HAS_B2=b2 is not None,
        MM_DTYPE=dispatch.tl_dtype(mm),
        DOT_DTYPE=dispatch.dot_dtype(mm),
        DOT_PRECISION=dispatch.dot_precision(mm),
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        BLOCK_K=block_k,
    )  # fmt: skip
    return partial[0] if n_splits == 1 else partial.sum(0)


def reduce_blocks(mm: torch.dtype) -> tuple[int, int, int]:
    return (64, 64, 32) if dispatch.interpreting() or mm == torch.float32 else (64, 64, 64)


def bwd_triton(g, x, z, h, w_down, w_up, b_up, scale):
    M, C = g.shape
    R = w_down.shape[0]
    mm = w_down.dtype
    block_r = bottleneck_block(R)
    block_m = bwd_block_m(mm)
    for cfg in kernel_configs("bwd", mm):
        dispatch.assert_dot_dims(BLOCK_M=block_m, BLOCK_C=cfg.kwargs["BLOCK_C"], BLOCK_R=block_r)
    n_tiles = triton.cdiv(M, block_m)
    du = dispatch.new_buffer((M, C), x.dtype, x.device)
    dh = dispatch.new_buffer((M, R), mm, x.device)
    gsum = dispatch.new_buffer((n_tiles, C), torch.float32, x.device)
    dhsum = dispatch.new_buffer((n_tiles, R), torch.float32, x.device)
    dscale_part = dispatch.new_buffer((n_tiles,), torch.float32, x.device)
    if M > 0:
        dispatch.launch(
            adapter_bwd_tokens_kernel,
            lambda meta: (n_tiles,),
            g, h, w_down, w_up, scale, du, dh, gsum, dhsum, dscale_part, M, C, R,
            configs=kernel_configs("bwd", mm),
            key=("C", "R"),
            MM_DTYPE=dispatch.tl_dtype(mm),
            DOT_DTYPE=dispatch.dot_dtype(mm),
            DOT_PRECISION=dispatch.dot_precision(mm),
            BLOCK_M=block_m,
            BLOCK_R=block_r,
        )  # fmt: skip
    s = scale.float().reshape(())
    g_colsum = gsum.sum(0)  # (C,)
    d_scale = dscale_part.sum() + (g_colsum * b_up.float()).sum()
    d_b_up = s * g_colsum
    d_b_down = dhsum.sum(0)
    if M > 0:
        d_w_up = s * token_reduce(g, h, mm, gelu_b=True)  # (C, R)
        d_w_down = token_reduce(dh, x, mm, z)  # (R, C)
    else:
        d_w_up, d_w_down = (
            w_up.new_zeros(w_up.shape, dtype=torch.float32),
            w_down.new_zeros(w_down.shape, dtype=torch.float32),
        )
    return du, d_w_down, d_b_down, d_w_up, d_b_up, d_scale
