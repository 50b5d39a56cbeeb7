"""Fused adapter bottleneck: out = u + scale * (gelu(u @ w_down.T + b_down) @ w_up.T + b_up), u = x (+ z).

Shapes: x, z (..., C) tokens, flattened here to (M, C); w_down (R, C) and w_up (C, R) like nn.Linear
weights; b_down (R,), b_up (C,); scale a 0-d or 1-element tensor. All dots accumulate in fp32.
Two dtypes: x's (u, the residual add, the output, the grads of x and z) and the matmul dtype MM, the
weights' dtype (x's own, or the autocast dtype: `fused_adapter` casts the weights as autocast would).
Every matmul operand is rounded to MM, and h, gelu(h), y and the matmul grads are rounded to MM where
eager autocast rounds them, so the op returns what the eager module returns under autocast.

Forward (`_adapter_fwd_kernel`, one program per BLOCK_M tokens):
    phase 1  h = MM(u) @ w_down.T + b_down     (BLOCK_M, BLOCK_R) fp32 over the C loop, then rounded to MM
    phase 2  a = MM(gelu(h))                   (what eager feeds the next matmul)
             y = MM(a @ w_up[c].T + b_up[c]); out[:, c] = u[:, c] + scale * y for each C chunk (u re-read)
The bottleneck activation never goes to global memory, except that h itself (M, R) is stored when a
backward will follow (`save_h`).

Backward STORES h rather than recomputing it: recomputing needs u @ w_down.T again, i.e. re-reading the
whole (M, C) input (C = 4R), while storing costs one write plus one read of the (M, R) tensor: about half the
bytes and none of the FLOPs. h is stored in MM, the precision eager PyTorch saves it in.
Under `torch.no_grad()` (or when nothing requires grad) nothing is stored.

Backward (`_adapter_bwd_tokens_kernel`, one program per BLOCK_M tokens, then two reduction GEMMs):
    gw  = MM(g) @ w_up                          (BLOCK_M, R)   g = grad of out
    dh  = MM(scale * gw) * gelu'(h)             stored (M, R) in MM for the weight gradient
    du  = g + MM(MM(dh) @ w_down)               (M, C) = grad of x (and of z)
    per-tile partial sums: colsum(g) (-> b_up, scale), colsum(dh) (-> b_down), sum(gelu(h) * gw) (-> scale)
    dw_up   = scale * g.T @ gelu(h)             `_token_reduce_kernel`, gelu applied while loading h
    dw_down = dh.T @ u                          `_token_reduce_kernel`, u = x + z formed while loading
    dscale  = sum(gelu(h) * gw) + colsum(g) . b_up
The two weight gradients are sums over all M tokens: a split-K Triton GEMM writes fp32 partials per split
(deterministic, no atomics) that torch sums.

fp32 inputs: tl.dot runs IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set (dispatch.dot_precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _adapter_fwd_kernel(
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


def _adapter_bwd_tokens_kernel(
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


def _token_reduce_kernel(
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


def _configs(kind: str, dtype: torch.dtype) -> list:
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
        "bwd": [  # BLOCK_M = 32 (_bwd_block_m): every 64-token tile spilled, whatever the warps
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


def _block_r(R: int) -> int:
    if R > MAX_BOTTLENECK:
        raise ValueError(
            f"fused_adapter: bottleneck {R} > {MAX_BOTTLENECK} is not supported by the Triton path"
        )
    return max(16, triton.next_power_of_2(R))


def _bwd_block_m(dtype: torch.dtype) -> int:
    """Tokens per backward tile, fixed (not tuned): it sizes the per-tile partial-sum buffers. 32 for every
    dtype: (64, 256) fp32 tiles of gw, h and dh spill registers on sm_90 at every warp count tried."""
    return 32


def _fwd_triton(x, z, w_down, b_down, w_up, b_up, scale, save_h: bool):
    M, C = x.shape  # (M, C)
    R = w_down.shape[0]
    mm = w_down.dtype  # matmul operand dtype: x's, or the autocast dtype
    block_r = _block_r(R)
    for cfg in _configs("fwd", mm):
        dispatch.assert_dot_dims(
            BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_C=cfg.kwargs["BLOCK_C"], BLOCK_R=block_r
        )
    out = dispatch.new_buffer((M, C), x.dtype, x.device)
    h = dispatch.new_buffer((M, R) if save_h else (0,), mm, x.device)
    if M == 0:
        return out, h
    dispatch.launch(
        _adapter_fwd_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        x, x if z is None else z, w_down, b_down, w_up, b_up, scale, out, h, M, C, R,
        configs=_configs("fwd", mm),
        key=("C", "R"),
        HAS_Z=z is not None,
        SAVE_H=save_h,
        MM_DTYPE=dispatch.tl_dtype(mm),
        DOT_DTYPE=dispatch.dot_dtype(mm),
        DOT_PRECISION=dispatch.dot_precision(mm),
        BLOCK_R=block_r,
    )  # fmt: skip
    return out, h


def _token_reduce(
    a: torch.Tensor, b: torch.Tensor, mm: torch.dtype, b2: torch.Tensor | None = None, gelu_b: bool = False
):
    """fp32 (NI, NJ) = a.T @ f(b) over M tokens; a (M, NI), b (M, NJ); f adds b2 and/or applies GELU; both
    operands rounded to the matmul dtype `mm`."""
    M, NI = a.shape
    NJ = b.shape[1]
    block_i, block_j, block_k = _reduce_blocks(mm)
    dispatch.assert_dot_dims(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k)
    tiles = triton.cdiv(NI, block_i) * triton.cdiv(NJ, block_j)
    # enough splits of the token axis to give every SM a few programs
    n_splits = max(1, min(triton.cdiv(4 * dispatch.num_sms(a.device), tiles), triton.cdiv(M, block_k)))
    tokens_per_split = triton.cdiv(triton.cdiv(M, n_splits), block_k) * block_k
    n_splits = triton.cdiv(M, tokens_per_split)
    partial = dispatch.new_buffer((n_splits, NI, NJ), torch.float32, a.device)
    dispatch.launch(
        _token_reduce_kernel,
        lambda meta: (triton.cdiv(NI, block_i), triton.cdiv(NJ, block_j), n_splits),
        a, b, b if b2 is None else b2, partial, M, NI, NJ, tokens_per_split,
        configs=_configs("reduce", mm),
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


def _reduce_blocks(mm: torch.dtype) -> tuple[int, int, int]:
    return (64, 64, 32) if dispatch.interpreting() or mm == torch.float32 else (64, 64, 64)


def _bwd_triton(g, x, z, h, w_down, w_up, b_up, scale):
    M, C = g.shape
    R = w_down.shape[0]
    mm = w_down.dtype
    block_r = _block_r(R)
    block_m = _bwd_block_m(mm)
    for cfg in _configs("bwd", mm):
        dispatch.assert_dot_dims(BLOCK_M=block_m, BLOCK_C=cfg.kwargs["BLOCK_C"], BLOCK_R=block_r)
    n_tiles = triton.cdiv(M, block_m)
    du = dispatch.new_buffer((M, C), x.dtype, x.device)
    dh = dispatch.new_buffer((M, R), mm, x.device)
    gsum = dispatch.new_buffer((n_tiles, C), torch.float32, x.device)
    dhsum = dispatch.new_buffer((n_tiles, R), torch.float32, x.device)
    dscale_part = dispatch.new_buffer((n_tiles,), torch.float32, x.device)
    if M > 0:
        dispatch.launch(
            _adapter_bwd_tokens_kernel,
            lambda meta: (n_tiles,),
            g, h, w_down, w_up, scale, du, dh, gsum, dhsum, dscale_part, M, C, R,
            configs=_configs("bwd", mm),
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
        d_w_up = s * _token_reduce(g, h, mm, gelu_b=True)  # (C, R)
        d_w_down = _token_reduce(dh, x, mm, z)  # (R, C)
    else:
        d_w_up, d_w_down = (
            w_up.new_zeros(w_up.shape, dtype=torch.float32),
            w_down.new_zeros(w_down.shape, dtype=torch.float32),
        )
    return du, d_w_down, d_b_down, d_w_up, d_b_up, d_scale


# ----------------------------------------------------------------------------------------------------------
# torch implementations (CPU default; also the executable spec of the backward)


def _fwd_torch(x, z, w_down, b_down, w_up, b_up, scale, save_h: bool):
    mm = w_down.dtype  # matmul dtype (x's, or autocast's)
    u = x if z is None else x + z  # (M, C) in x's dtype
    h = F.linear(u.to(mm), w_down, b_down)  # (M, R) in mm
    y = F.linear(F.gelu(h), w_up, b_up)  # (M, C) in mm
    out = (u.float() + scale.float().reshape(()) * y.float()).to(x.dtype)
    return out, (h if save_h else x.new_empty(0, dtype=mm))


def _bwd_torch(g, x, z, h, w_down, w_up, b_up, scale):
    """The kernels' backward in torch, with the same rounding points to the matmul dtype `mm`."""
    mm = w_down.dtype

    def rnd(t):  # round to the matmul dtype, compute on in fp32
        return t.to(mm).float()

    u = rnd(x if z is None else x + z)  # (M, C), the down matmul's input
    g = g.float()
    hf = h.float()  # (M, R)
    cdf = 0.5 * (1.0 + torch.erf(hf * SQRT1_2))
    a = rnd(hf * cdf)
    s = scale.float().reshape(())
    gw = rnd(g) @ w_up.float()  # (M, R)
    g_colsum = g.sum(0)  # (C,)
    d_scale = (a * gw).sum() + (g_colsum * b_up.float()).sum()
    dh = rnd(s * gw) * (cdf + hf * torch.exp(-0.5 * hf * hf) * INV_SQRT_2PI)
    du = g + rnd(rnd(dh) @ w_down.float())
    return du, rnd(dh).T @ u, dh.sum(0), s * (rnd(g).T @ a), s * g_colsum, d_scale


# ----------------------------------------------------------------------------------------------------------
# custom ops + autograd


@torch.library.custom_op("sak::adapter_fwd", mutates_args=())
def _adapter_fwd_op(
    x: torch.Tensor,
    z: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: torch.Tensor,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (..., C) in x's dtype, h (M, R) in the weights' dtype or empty) of the adapter; h is what
    backward needs. The weights' dtype is the matmul dtype (x's, or the autocast dtype: see fused_adapter)."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C).contiguous()  # (M, C)
    z2 = None if z is None else z.reshape(-1, C).contiguous()
    args = (w_down.contiguous(), b_down.contiguous(), w_up.contiguous(), b_up.contiguous())
    scale1 = scale.reshape(1).contiguous()
    if _backend(w_down.dtype, x, z, *args, scale) == "triton":
        out, h = dispatch.triton_or_torch(
            ("adapter_fwd", x.dtype, w_down.dtype, C, w_down.shape[0]),
            lambda: _fwd_triton(x2, z2, *args, scale1, save_h),
            lambda: _fwd_torch(x2, z2, *args, scale1, save_h),
        )
    else:
        out, h = _fwd_torch(x2, z2, *args, scale1, save_h)
    return out.reshape(x.shape), h


def _backend(mm: torch.dtype, x: torch.Tensor, *tensors: torch.Tensor | None) -> str:
    """Triton only if both x's dtype and the matmul dtype `mm` are ones the kernels take."""
    dtype = mm if x.dtype in dispatch.TRITON_DTYPES else x.dtype
    return dispatch.kernel_backend(x, *tensors, dtype=dtype)


@_adapter_fwd_op.register_fake
def _(x, z, w_down, b_down, w_up, b_up, scale, save_h):
    m = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty((m, w_down.shape[0]) if save_h else (0,), dtype=w_down.dtype)


@torch.library.custom_op("sak::adapter_bwd", mutates_args=())
def _adapter_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor | None,
    h: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (du, dw_down, db_down, dw_up, db_up, dscale); du is the grad of both x and z."""
    C = x.shape[-1]
    g = grad_out.reshape(-1, C).contiguous()  # (M, C); `.sum().backward()` hands a stride-0 tensor
    x2 = x.reshape(-1, C).contiguous()
    z2 = None if z is None else z.reshape(-1, C).contiguous()
    if h.numel() == 0 and g.shape[0] > 0:
        raise RuntimeError("sak::adapter_bwd needs the h saved by sak::adapter_fwd(save_h=True)")
    wd, wu, bu = w_down.contiguous(), w_up.contiguous(), b_up.contiguous()
    g = g.to(x.dtype)
    if _backend(wd.dtype, x, g, z, h, wd, wu, bu, scale) == "triton":
        grads = dispatch.triton_or_torch(
            ("adapter_bwd", x.dtype, wd.dtype, C, wd.shape[0]),
            lambda: _bwd_triton(g, x2, z2, h, wd, wu, bu, scale.reshape(1).contiguous()),
            lambda: _bwd_torch(g, x2, z2, h, wd, wu, bu, scale),
        )
    else:
        grads = _bwd_torch(g, x2, z2, h, wd, wu, bu, scale)
    du, dwd, dbd, dwu, dbu, dscale = grads
    return (
        du.to(x.dtype).reshape(x.shape),
        dwd.to(w_down.dtype),
        dbd.to(w_down.dtype),
        dwu.to(w_up.dtype),
        dbu.to(b_up.dtype),
        dscale.to(scale.dtype).reshape(scale.shape),
    )


@_adapter_bwd_op.register_fake
def _(grad_out, x, z, h, w_down, w_up, b_up, scale):
    R = w_down.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(w_down),
        w_down.new_empty((R,)),
        torch.empty_like(w_up),
        torch.empty_like(b_up),
        torch.empty_like(scale),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, z, w_down, b_down, w_up, b_up, scale, save_h = inputs
    ctx.has_z = z is not None
    ctx.save_for_backward(x, z if z is not None else x, output[1], w_down, w_up, b_up, scale)


def _fwd_backward(ctx, grad_out, grad_h):
    x, z, h, w_down, w_up, b_up, scale = ctx.saved_tensors
    z = z if ctx.has_z else None
    du, dwd, dbd, dwu, dbu, dscale = torch.ops.sak.adapter_bwd(grad_out, x, z, h, w_down, w_up, b_up, scale)
    return du, (du if ctx.has_z else None), dwd, dbd, dwu, dbu, dscale, None


_adapter_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public API


def fused_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: torch.Tensor,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """u + scale * (gelu(u @ w_down.T + b_down) @ w_up.T + b_up) with u = x (+ z); x, z (..., C).

    Follows autocast as eager PyTorch does: inside `torch.autocast(device, dtype)` the two linears run in the
    autocast dtype (their inputs, weights and biases cast to it, fp32 accumulation, outputs h and y rounded
    to it, GELU on the rounded h and rounded again), while u = x + z, the residual add and the output stay
    in x's dtype (fp32 in training: the stem's stream). Outside autocast the matmuls run in x's dtype.
    Weights are cast here, so autograd returns their grads in their own dtype; scale keeps its dtype.
    Triton on CUDA, torch on CPU, or as forced by SAK_KERNELS (see dispatch).
    """
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=x.device)
    assert scale.numel() == 1, f"scale must have one element, got shape {tuple(scale.shape)}"
    mm = matmul_dtype(x)
    w_down, b_down, w_up, b_up = (t.to(mm) for t in (w_down, b_down, w_up, b_up))
    z = None if z is None else z.to(x.dtype)
    tensors = (x, z, w_down, b_down, w_up, b_up, scale)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, _ = torch.ops.sak.adapter_fwd(x, z, w_down, b_down, w_up, b_up, scale, save_h)
    return out


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype eager `F.linear(x, ...)` would compute in here: the autocast dtype when autocast is on for
    x's device type (and x is floating), else x's own dtype."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def adapter_reference(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: torch.Tensor,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: eager in x's dtype, or under autocast as autocast runs it (the baseline the fused op is
    benchmarked against)."""
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=x.device)
    u = x if z is None else x + z  # (..., C)
    h = F.linear(u, w_down.to(x.dtype), b_down.to(x.dtype))  # (..., R)
    # a 0-d scale keeps the output in x's dtype (a (1,)-shaped one would promote bf16 to fp32)
    return u + scale.reshape(()) * F.linear(F.gelu(h), w_up.to(x.dtype), b_up.to(x.dtype))


def adapter_flops(tokens: int, C: int, R: int, backward: bool = False) -> int:
    """Matmul FLOPs of the forward (2 GEMMs of 2*M*C*R), or of forward + backward (`backward`, 6 GEMMs)."""
    return (6 if backward else 2) * 2 * tokens * C * R


__all__ = ["fused_adapter", "adapter_reference", "adapter_flops", "matmul_dtype", "MAX_BOTTLENECK"]
