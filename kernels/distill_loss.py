"""Fused distillation loss: cos_weight * mean_b(1 - cos_b) + l1_weight * smooth_l1(student, target, beta).

student, target: (B, ..., C) of the same shape, each in its own dtype (fp32 / fp16 / bf16) and its own strides:
the trainer passes a permuted view of a channels-first student map and the cached target as stored, and
neither is copied. Both are read as (B, P, C), P the positions, when the middle dims merge (else copied).
cos_b is the cosine of image b's flattened maps with F.cosine_similarity's convention: each norm clamped to
eps = 1e-8. The target gets no gradient.

With ns, nt the clamped norms and N = B * P * C, the student gradient is linear in the data once the
per-image sums are known:
    grad = g_loss * (alpha_b * t + gamma_b * s + l1_weight / N * smooth_l1'(s - t))
    alpha_b = -cos_weight / (B * ns * nt)     gamma_b = cos_weight * cos_b / (B * ns^2)  (0 if the norm clamps)

Triton, three launches, none of which waits for another program of the same launch:
    forward  `_loss_partial_kernel`   one program per chunk (ROWS positions x all C of one image): the sums
                                      of s*t, s*s, t*t and smooth_l1 -> partial[4, chunk] (fp32)
             `_loss_finalize_kernel`  one program: each image's partials summed in chunk order -> alpha,
                                      gamma, cosine; the loss scalar summed in image order
    backward `_loss_grad_kernel`      one program per chunk: reads grad_loss and the image's (alpha, gamma)
                                      from device memory, re-reads s and t, writes the gradient once
Why no program order can block: a program of the partial or grad kernel reads only the op's inputs and
buffers written by an EARLIER launch (stream order), and writes only its own chunk's slots; the finalize
kernel is one program. No program reads a slot another program of its own launch writes, so there is no
flag, ticket or counter to wait on, and any order (tests launch the chunks in reverse) gives the same bits:
every sum runs in a fixed order (no float atomics), so results are deterministic.
Bytes: forward reads s and t once; backward reads them again and writes the gradient (5 passes over a map
in all; a single pass would need every image's sums before its first gradient element, i.e. waiting).
Sizes: offsets are int64, 1 / N and 1 / B are fp32 computed on the host, so no size product is int32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sak.kernels import dispatch
from sak.kernels.dispatch import SUM_COMBINE as _SUM
from sak.kernels.dispatch import tl, triton

COS_EPS = 1e-8  # as F.cosine_similarity

# layout codes of a (B, P, C) operand, constexpr so that the contiguous dim is known at compile time
# (coalesced loads): channels contiguous (stride_c == 1), positions contiguous (stride_p == 1), neither
CHANNELS_LAST, CHANNELS_FIRST, STRIDED = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted by dispatch.launch for the current interpret mode)


def _loss_partial_kernel(
    s_ptr,  # (B, P, C) student, strides (ssb, ssp, ssc)
    t_ptr,  # (B, P, C) target, strides (stb, stp, stc)
    partial_ptr,  # (4, B * n_split) fp32: per-chunk sums of s*t, s*s, t*t, smooth_l1
    P,
    C,
    ssb,
    ssp,
    ssc,
    stb,
    stp,
    stc,
    n_split,  # chunks per image
    n_chunks,  # B * n_split
    beta,
    inv_beta,  # 1 / beta, 0 when beta == 0 (pure L1)
    S_LAYOUT: tl.constexpr,
    T_LAYOUT: tl.constexpr,
    ROWS: tl.constexpr,  # positions per chunk, a multiple of BLOCK_P
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr,
):
    v = tl.program_id(0)
    if REVERSE:  # tests: run the chunks in reverse order
        v = n_chunks - 1 - v
    b = v // n_split  # image
    k = v % n_split  # chunk of the image
    b64 = b.to(tl.int64)
    acc_st = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    acc_ss = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    acc_tt = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    acc_l1 = tl.full((BLOCK_P, BLOCK_C), 0.0, tl.float32)
    for p0 in range(0, ROWS, BLOCK_P):
        p = k * ROWS + p0 + tl.arange(0, BLOCK_P)  # (BP,)
        p_ok = p < P
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)  # (BC,)
            ok = p_ok[:, None] & (c < C)[None, :]
            p64 = p.to(tl.int64)[:, None]  # (BP, 1)
            c64 = c.to(tl.int64)[None, :]  # (1, BC)
            # offsets (BP, BC); the layout codes make the unit stride a compile-time constant
            if S_LAYOUT == 0:
                s_off = b64 * ssb + p64 * ssp + c64
            elif S_LAYOUT == 1:
                s_off = b64 * ssb + p64 + c64 * ssc
            else:
                s_off = b64 * ssb + p64 * ssp + c64 * ssc
            if T_LAYOUT == 0:
                t_off = b64 * stb + p64 * stp + c64
            elif T_LAYOUT == 1:
                t_off = b64 * stb + p64 + c64 * stc
            else:
                t_off = b64 * stb + p64 * stp + c64 * stc
            s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(tl.float32)  # (BP, BC)
            t = tl.load(t_ptr + t_off, mask=ok, other=0.0).to(tl.float32)
            d = s - t
            ad = tl.abs(d)
            acc_st += s * t
            acc_ss += s * s
            acc_tt += t * t
            acc_l1 += tl.where(ad < beta, 0.5 * d * d * inv_beta, ad - 0.5 * beta)  # 0 where masked
    v64 = v.to(tl.int64)
    tl.store(partial_ptr + v64, tl.reduce(tl.reduce(acc_st, 1, _SUM), 0, _SUM))
    tl.store(partial_ptr + n_chunks + v64, tl.reduce(tl.reduce(acc_ss, 1, _SUM), 0, _SUM))
    tl.store(partial_ptr + 2 * n_chunks + v64, tl.reduce(tl.reduce(acc_tt, 1, _SUM), 0, _SUM))
    tl.store(partial_ptr + 3 * n_chunks + v64, tl.reduce(tl.reduce(acc_l1, 1, _SUM), 0, _SUM))


def _loss_finalize_kernel(
    partial_ptr,  # (4, B * n_split) fp32
    coef_ptr,  # (B, 2) fp32 out: alpha, gamma
    cos_ptr,  # (B,) fp32 out
    loss_ptr,  # (1,) fp32 out
    B,
    n_split,
    n_chunks,
    cos_weight,
    l1_weight,
    inv_b,  # 1 / B
    inv_numel,  # 1 / (B * P * C)
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: images BLOCK_B at a time, each image's chunks BLOCK_K at a time, in a fixed order."""
    total = tl.full((BLOCK_B,), 0.0, tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)  # (BB,)
        b_ok = b < B
        st = tl.full((BLOCK_B,), 0.0, tl.float32)
        ss = tl.full((BLOCK_B,), 0.0, tl.float32)
        tt = tl.full((BLOCK_B,), 0.0, tl.float32)
        l1 = tl.full((BLOCK_B,), 0.0, tl.float32)
        for k0 in range(0, n_split, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            ok = b_ok[:, None] & (k < n_split)[None, :]
            q = partial_ptr + (b.to(tl.int64)[:, None] * n_split + k[None, :])  # (BB, BK)
            st += tl.reduce(tl.load(q, mask=ok, other=0.0), 1, _SUM)
            ss += tl.reduce(tl.load(q + n_chunks, mask=ok, other=0.0), 1, _SUM)
            tt += tl.reduce(tl.load(q + 2 * n_chunks, mask=ok, other=0.0), 1, _SUM)
            l1 += tl.reduce(tl.load(q + 3 * n_chunks, mask=ok, other=0.0), 1, _SUM)
        ns_raw = tl.sqrt(ss)
        ns = tl.maximum(ns_raw, eps)
        nt = tl.maximum(tl.sqrt(tt), eps)
        cos = st / (ns * nt)
        alpha = -cos_weight * inv_b / (ns * nt)
        gamma = tl.where(ns_raw > eps, cos_weight * inv_b * cos / (ns * ns), 0.0)
        tl.store(coef_ptr + 2 * b, alpha, mask=b_ok)
        tl.store(coef_ptr + 2 * b + 1, gamma, mask=b_ok)
        tl.store(cos_ptr + b, cos, mask=b_ok)
        total += tl.where(b_ok, cos_weight * inv_b * (1.0 - cos) + l1_weight * inv_numel * l1, 0.0)
    tl.store(loss_ptr, tl.reduce(total, 0, _SUM))


def _loss_grad_kernel(
    grad_loss_ptr,  # (1,) fp32: d(out loss)
    coef_ptr,  # (B, 2) fp32: alpha, gamma
    s_ptr,  # (B, P, C) student
    t_ptr,  # (B, P, C) target
    g_ptr,  # (B, P, C) out, the student's strides
    P,
    C,
    ssb,
    ssp,
    ssc,
    stb,
    stp,
    stc,
    n_split,
    n_chunks,
    l1_scale,  # l1_weight / N
    beta,
    inv_beta,
    S_LAYOUT: tl.constexpr,
    T_LAYOUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr,
):
    v = tl.program_id(0)
    if REVERSE:  # tests: run the chunks in reverse order
        v = n_chunks - 1 - v
    b = v // n_split  # image
    k = v % n_split  # chunk of the image
    b64 = b.to(tl.int64)
    g_loss = tl.load(grad_loss_ptr).to(tl.float32)
    alpha = g_loss * tl.load(coef_ptr + 2 * b)
    gamma = g_loss * tl.load(coef_ptr + 2 * b + 1)
    l1 = g_loss * l1_scale
    for p0 in range(0, ROWS, BLOCK_P):
        p = k * ROWS + p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = p_ok[:, None] & (c < C)[None, :]
            p64 = p.to(tl.int64)[:, None]  # (BP, 1)
            c64 = c.to(tl.int64)[None, :]  # (1, BC)
            # offsets (BP, BC); the layout codes make the unit stride a compile-time constant
            if S_LAYOUT == 0:
                s_off = b64 * ssb + p64 * ssp + c64
            elif S_LAYOUT == 1:
                s_off = b64 * ssb + p64 + c64 * ssc
            else:
                s_off = b64 * ssb + p64 * ssp + c64 * ssc
            if T_LAYOUT == 0:
                t_off = b64 * stb + p64 * stp + c64
            elif T_LAYOUT == 1:
                t_off = b64 * stb + p64 + c64 * stc
            else:
                t_off = b64 * stb + p64 * stp + c64 * stc
            s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + t_off, mask=ok, other=0.0).to(tl.float32)
            d = s - t
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            dl1 = tl.where(tl.abs(d) < beta, d * inv_beta, sign)
            g = alpha * t + gamma * s + l1 * dl1
            tl.store(g_ptr + s_off, g.to(g_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# launchers


def _is_dense(x: torch.Tensor) -> bool:
    """Its elements fill one block of memory exactly once (any dim order, e.g. a permuted contiguous tensor)."""
    expected = 1
    for stride, n in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= n
    return True


def as_bpc(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, ..., C) as a (B, P, C) view and its layout code, without a copy when x is dense and its middle
    dims merge (a contiguous map, or a permuted view of a channels-first one); otherwise a contiguous copy.

    A 2-D (B, D) tensor is (B, 1, D).
    """
    B, C = x.shape[0], x.shape[-1]
    P = math.prod(x.shape[1:-1])  # 1 for a 2-D x
    mid_shape, mid_stride = x.shape[1:-1], x.stride()[1:-1]
    merges = all(
        mid_stride[i] == mid_stride[i + 1] * mid_shape[i + 1]
        for i in range(len(mid_shape) - 1)
        if mid_shape[i] > 1
    )
    if not (merges and _is_dense(x)):
        x = x.contiguous()
    stride_p = x.stride()[-2] if x.dim() > 2 else 0
    view = x.as_strided((B, P, C), (x.stride(0), stride_p, x.stride(-1)))
    if view.stride(2) == 1 or C == 1:
        return view, CHANNELS_LAST
    if view.stride(1) == 1 or P == 1:
        return view, CHANNELS_FIRST
    return view, STRIDED


def _tiles(P: int, C: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_P, BLOCK_C): a tile is BLOCK_P positions x BLOCK_C channels, a chunk ROWS positions x all
    C channels, about 32K elements (at least one row of tiles): e.g. 40 x 768 for a ViT-B-width map.
    A 2-D (B, D) input (P = 1) is one chunk per image: fine for tests, not for large D."""
    tile, chunk = (256, 1024) if dispatch.interpreting() else (2048, 32768)
    block_c = min(triton.next_power_of_2(C), tile if P == 1 else 256)
    block_p = max(1, tile // block_c)
    rows = block_p * max(1, min(triton.cdiv(P, block_p), chunk // (block_p * C)))
    return rows, block_p, block_c


class _Launch:
    """Shapes, strides and chunking of one (student, target) pair, shared by the forward and backward."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, rows: int | None = None):
        self.s, self.s_layout = as_bpc(s)  # (B, P, C)
        self.t, self.t_layout = as_bpc(t)
        self.B, self.P, self.C = self.s.shape
        self.rows, self.block_p, self.block_c = _tiles(self.P, self.C)
        if rows is not None:  # tests: other chunk sizes
            self.rows, self.block_p = rows, math.gcd(self.block_p, rows)
        self.n_split = triton.cdiv(self.P, self.rows)
        self.n_chunks = self.B * self.n_split

    def common(self) -> tuple:
        return (self.P, self.C, *self.s.stride(), *self.t.stride(), self.n_split, self.n_chunks)

    def constexprs(self, reverse: bool) -> dict:
        return dict(
            S_LAYOUT=self.s_layout,
            T_LAYOUT=self.t_layout,
            ROWS=self.rows,
            BLOCK_P=self.block_p,
            BLOCK_C=self.block_c,
            REVERSE=reverse,
        )


def _config(num_warps: int = 4):
    return [triton.Config({}, num_warps=num_warps, num_stages=1)]


def _finalize_blocks(lc: _Launch) -> dict[str, int]:
    """Tile of the finalize kernel: 32 images x 64 chunks (4 sums of 2048 fp32 over 128 threads, no spills)."""
    return dict(
        BLOCK_B=min(32, triton.next_power_of_2(lc.B)), BLOCK_K=min(64, triton.next_power_of_2(lc.n_split))
    )


def _fwd_triton(s, t, cos_weight, l1_weight, beta, rows=None, reverse=False):
    """s, t (B, ...) -> (loss (), cos (B,), coef (B, 2)), all fp32."""
    lc = _Launch(s, t, rows)
    dev = s.device
    partial = dispatch.new_buffer((4, lc.n_chunks), torch.float32, dev)
    dispatch.launch(
        _loss_partial_kernel,
        lambda meta: (lc.n_chunks,),
        lc.s, lc.t, partial, *lc.common(), float(beta), 1.0 / beta if beta > 0 else 0.0,
        configs=_config(),
        **lc.constexprs(reverse),
    )  # fmt: skip
    coef = dispatch.new_buffer((lc.B, 2), torch.float32, dev)
    cos = dispatch.new_buffer((lc.B,), torch.float32, dev)
    loss = dispatch.new_buffer((1,), torch.float32, dev)
    dispatch.launch(
        _loss_finalize_kernel,
        lambda meta: (1,),
        partial, coef, cos, loss, lc.B, lc.n_split, lc.n_chunks, float(cos_weight), float(l1_weight),
        1.0 / lc.B, 1.0 / (lc.B * lc.P * lc.C), COS_EPS,
        configs=_config(),
        **_finalize_blocks(lc),
    )  # fmt: skip
    return loss.reshape(()), cos, coef


def _bwd_triton(grad_loss, s, t, coef, l1_weight, beta, rows=None, reverse=False):
    """The student gradient, with the student's shape and dtype, in the strides the kernel read it with."""
    lc = _Launch(s, t, rows)
    grad = dispatch.new_buffer((lc.s.numel(),), s.dtype, s.device).as_strided(lc.s.shape, lc.s.stride())
    dispatch.launch(
        _loss_grad_kernel,
        lambda meta: (lc.n_chunks,),
        grad_loss.reshape(1).float(), coef, lc.s, lc.t, grad, *lc.common(),
        float(l1_weight) / (lc.B * lc.P * lc.C), float(beta), 1.0 / beta if beta > 0 else 0.0,
        configs=_config(),
        **lc.constexprs(reverse),
    )  # fmt: skip
    return grad.view(s.shape)  # splits P back into the middle dims: always a view


# ----------------------------------------------------------------------------------------------------------
# torch implementations (CPU default, the fallback, and the executable spec of the kernels)


def _sums_torch(s, t):
    B = s.shape[0]
    sf, tf = s.reshape(B, -1).float(), t.reshape(B, -1).float()  # (B, D)
    return sf, tf


def _fwd_torch(s, t, cos_weight, l1_weight, beta):
    sf, tf = _sums_torch(s, t)
    st = (sf * tf).sum(1)
    ns_raw, nt_raw = sf.norm(dim=1), tf.norm(dim=1)
    ns, nt = ns_raw.clamp_min(COS_EPS), nt_raw.clamp_min(COS_EPS)
    cos = st / (ns * nt)  # (B,)
    loss = cos_weight * (1 - cos).mean() + l1_weight * F.smooth_l1_loss(sf, tf, beta=beta)
    B = sf.shape[0]
    alpha = -cos_weight / (B * ns * nt)
    gamma = torch.where(ns_raw > COS_EPS, cos_weight * cos / (B * ns * ns), torch.zeros_like(cos))
    return loss, cos, torch.stack([alpha, gamma], 1)


def _bwd_torch(grad_loss, s, t, coef, l1_weight, beta):
    sf, tf = _sums_torch(s, t)
    d = sf - tf
    dl1 = torch.where(d.abs() < beta, d / beta if beta > 0 else d, torch.sign(d))
    grad = coef[:, :1] * tf + coef[:, 1:] * sf + l1_weight / sf.numel() * dl1
    return (grad_loss.float() * grad).reshape(s.shape).to(s.dtype)


# ----------------------------------------------------------------------------------------------------------
# custom ops + autograd


def _use_triton(s: torch.Tensor, t: torch.Tensor) -> bool:
    if s.numel() == 0:
        return False
    if t.dtype not in dispatch.TRITON_DTYPES:
        return dispatch.kernel_backend(s, t, dtype=t.dtype) == "triton"
    return dispatch.kernel_backend(s, t, dtype=s.dtype) == "triton"


@torch.library.custom_op("sak::distill_loss_fwd", mutates_args=())
def _distill_loss_op(
    student: torch.Tensor, target: torch.Tensor, cos_weight: float, l1_weight: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () fp32, per-image cosines (B,) fp32, per-image (alpha, gamma) (B, 2) fp32 for the backward)."""
    args = (cos_weight, l1_weight, beta)
    if _use_triton(student, target):
        key = ("distill_loss_fwd", student.dtype, target.dtype, student.shape[1:])
        return dispatch.triton_or_torch(
            key, lambda: _fwd_triton(student, target, *args), lambda: _fwd_torch(student, target, *args)
        )
    return _fwd_torch(student, target, *args)


@_distill_loss_op.register_fake
def _(student, target, cos_weight, l1_weight, beta):
    B, f32 = student.shape[0], torch.float32
    return (
        student.new_empty((), dtype=f32),
        student.new_empty((B,), dtype=f32),
        student.new_empty((B, 2), dtype=f32),
    )


@torch.library.custom_op("sak::distill_loss_bwd", mutates_args=())
def _distill_loss_bwd_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    target: torch.Tensor,
    coef: torch.Tensor,
    l1_weight: float,
    beta: float,
) -> torch.Tensor:
    """Gradient w.r.t. the student (its shape, dtype and dense strides); grad_loss is read on the device."""
    args = (grad_loss, student, target, coef, l1_weight, beta)
    if _use_triton(student, target):
        key = ("distill_loss_bwd", student.dtype, target.dtype, student.shape[1:])
        grad = dispatch.triton_or_torch(key, lambda: _bwd_triton(*args), lambda: _bwd_torch(*args))
    else:
        grad = _bwd_torch(*args)
    return _in_strides_of(grad, student)


def _in_strides_of(grad: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """grad laid out as torch.empty_like(student) (what the fake promises torch.compile): as is in the
    trainer's case (the kernel writes in the student's own strides), else copied once."""
    if _is_dense(student) and grad.stride() == student.stride():
        return grad
    out = torch.empty_like(student)
    return grad if out.stride() == grad.stride() else out.copy_(grad)


@_distill_loss_bwd_op.register_fake
def _(grad_loss, student, target, coef, l1_weight, beta):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, target, _cos_weight, l1_weight, beta = inputs
    ctx.l1_weight, ctx.beta = l1_weight, beta
    ctx.save_for_backward(student, target, output[2])


def _backward(ctx, grad_loss, grad_cos, grad_coef):
    student, target, coef = ctx.saved_tensors
    grad = None
    if grad_loss is not None:
        grad = torch.ops.sak.distill_loss_bwd(grad_loss, student, target, coef, ctx.l1_weight, ctx.beta)
    return grad, None, None, None, None


_distill_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# public API


def distill_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    cos_weight: float = 0.9,
    l1_weight: float = 0.1,
    beta: float = 1.0,
    return_cosines: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused loss (fp32 scalar); with `return_cosines` also the per-image cosines (B,), detached.

    student and target may differ in dtype and strides (neither is copied or cast). Triton on CUDA, torch on
    CPU, or as forced by SAK_KERNELS (see dispatch). Target gets no gradient.
    """
    if student.shape != target.shape:
        raise ValueError(f"student {tuple(student.shape)} and target {tuple(target.shape)} differ in shape")
    if student.dim() < 2:
        raise ValueError(f"student of shape {tuple(student.shape)}: expected (B, ...) with B images")
    loss, cos, _ = torch.ops.sak.distill_loss_fwd(
        student, target.detach(), float(cos_weight), float(l1_weight), float(beta)
    )
    return (loss, cos.detach()) if return_cosines else loss


def distill_loss_reference(
    student: torch.Tensor,
    target: torch.Tensor,
    cos_weight: float = 0.9,
    l1_weight: float = 0.1,
    beta: float = 1.0,
    return_cosines: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (autograd), computed in at least fp32."""
    B = student.shape[0]
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = student.reshape(B, -1).to(dtype)  # (B, D)
    t = target.detach().reshape(B, -1).to(dtype)
    ns = s.norm(dim=1).clamp_min(COS_EPS)
    nt = t.norm(dim=1).clamp_min(COS_EPS)
    cos = (s * t).sum(1) / (ns * nt)  # (B,)
    loss = cos_weight * (1 - cos).mean() + l1_weight * F.smooth_l1_loss(s, t, beta=beta)
    return (loss, cos.detach()) if return_cosines else loss


__all__ = ["distill_loss", "distill_loss_reference", "COS_EPS"]
