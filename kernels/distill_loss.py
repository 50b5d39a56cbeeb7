"""Fused distillation loss: cos_weight * mean_b(1 - cos_b) + l1_weight * smooth_l1(student, target, beta).

student, target: (B, ...) of the same shape, viewed as (B, D). cos_b is the cosine of image b's flattened
maps with F.cosine_similarity's convention: each norm clamped to eps = 1e-8. The forward also produces the
gradient w.r.t. the student, saved for backward, which only scales it by grad_output; the target gets none.

With ns, nt the clamped norms and S = B * D, the student gradient is linear in the data once the per-image
sums are known:
    grad = alpha_b * t + gamma_b * s + l1_weight / S * smooth_l1'(s - t)
    alpha_b = -cos_weight / (B * ns * nt)     gamma_b = cos_weight * cos_b / (B * ns^2)  (0 if the norm clamps)

Triton kernel (`_distill_loss_kernel`): the (B, D) maps are cut into chunks of CHUNK elements, one image's
chunks consecutive; program ticket v (taken from an atomic counter, so tickets follow the order programs
actually started) does two phases:
    reduce  chunk v: sum s*t, s*s, t*t, smooth_l1 -> partial[v] (fp32). The last chunk of an image to arrive
            (per-image atomic counter) sums that image's partials in a fixed order (deterministic), writes the
            image's alpha, gamma, cosine and loss term, then raises the image's ready flag.
    grad    chunk v - LAG: wait for its image's ready flag, re-read s and t, write the gradient.
LAG >= chunks per image guarantees every chunk an image's flag depends on has a smaller ticket, i.e. belongs
to a program that is already running (no deadlock on the GPU; in ticket order under the interpreter). The
re-read happens LAG chunks after the first read, so it is served from L2 while LAG chunks of s and t fit
there: HBM sees one read of student and target and one write of the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sak.kernels import dispatch
from sak.kernels.dispatch import SUM_COMBINE as _SUM
from sak.kernels.dispatch import tl, triton

COS_EPS = 1e-8  # as F.cosine_similarity


# ----------------------------------------------------------------------------------------------------------
# Triton kernel (a plain function, jitted by dispatch.launch for the current interpret mode)


def _distill_loss_kernel(
    s_ptr,  # (B, D) student
    t_ptr,  # (B, D) target
    grad_ptr,  # (B, D) grad of the loss w.r.t. student, written if WRITE_GRAD
    partial_ptr,  # (B * n_split, 4) fp32: per-chunk sums of s*t, s*s, t*t, smooth_l1
    sync_ptr,  # (1 + 2B,) int32 zeros: [ticket, arrivals per image (B), ready flag per image (B)]
    coef_ptr,  # (B, 2) fp32: alpha, gamma
    cos_ptr,  # (B,) fp32
    loss_ptr,  # (B,) fp32 per-image terms of the loss (their sum is the loss)
    B,
    D,
    n_split,  # chunks per image
    lag,  # >= n_split
    cos_weight,
    l1_weight,
    beta,
    inv_beta,  # 1 / beta, 0 when beta == 0 (pure L1)
    eps,
    WRITE_GRAD: tl.constexpr,
    CHUNK: tl.constexpr,  # elements per chunk, a multiple of BLOCK
    BLOCK: tl.constexpr,
    SPLIT_P2: tl.constexpr,  # next power of two >= n_split
):
    n_chunks = B * n_split
    v = tl.atomic_add(sync_ptr, 1)  # ticket
    offs = tl.arange(0, BLOCK)  # (BLOCK,)

    if v < n_chunks:  # ---- reduce phase
        b = v // n_split
        start = (v % n_split) * CHUNK
        base = b.to(tl.int64) * D
        acc_st = tl.full((BLOCK,), 0.0, tl.float32)
        acc_ss = tl.full((BLOCK,), 0.0, tl.float32)
        acc_tt = tl.full((BLOCK,), 0.0, tl.float32)
        acc_l1 = tl.full((BLOCK,), 0.0, tl.float32)
        for off in range(0, CHUNK, BLOCK):
            idx = start + off + offs
            ok = idx < D
            s = tl.load(s_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
            d = s - t
            ad = tl.abs(d)
            acc_st += s * t
            acc_ss += s * s
            acc_tt += t * t
            acc_l1 += tl.where(ad < beta, 0.5 * d * d * inv_beta, ad - 0.5 * beta)  # 0 where masked
        p = partial_ptr + v.to(tl.int64) * 4
        tl.store(p + 0, tl.reduce(acc_st, 0, _SUM))
        tl.store(p + 1, tl.reduce(acc_ss, 0, _SUM))
        tl.store(p + 2, tl.reduce(acc_tt, 0, _SUM))
        tl.store(p + 3, tl.reduce(acc_l1, 0, _SUM))
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(sync_ptr + 1 + b, 1, sem="acq_rel")
        if arrived == n_split - 1:  # last chunk of image b: finalize the image
            k = tl.arange(0, SPLIT_P2)
            k_ok = k < n_split
            q = partial_ptr + (b * n_split + k).to(tl.int64) * 4  # (SPLIT_P2,)
            st = tl.reduce(tl.load(q + 0, mask=k_ok, other=0.0, cache_modifier=".cg"), 0, _SUM)
            ss = tl.reduce(tl.load(q + 1, mask=k_ok, other=0.0, cache_modifier=".cg"), 0, _SUM)
            tt = tl.reduce(tl.load(q + 2, mask=k_ok, other=0.0, cache_modifier=".cg"), 0, _SUM)
            l1 = tl.reduce(tl.load(q + 3, mask=k_ok, other=0.0, cache_modifier=".cg"), 0, _SUM)
            ns_raw = tl.sqrt(ss)
            ns = tl.maximum(ns_raw, eps)
            nt = tl.maximum(tl.sqrt(tt), eps)
            cos = st / (ns * nt)
            alpha = -cos_weight / (B * ns * nt)
            gamma = tl.where(ns_raw > eps, cos_weight * cos / (B * ns * ns), 0.0)
            tl.store(coef_ptr + 2 * b, alpha)
            tl.store(coef_ptr + 2 * b + 1, gamma)
            tl.store(cos_ptr + b, cos)
            tl.store(loss_ptr + b, cos_weight * (1.0 - cos) / B + l1_weight * l1 / (B * D))
            tl.debug_barrier()
            tl.atomic_xchg(sync_ptr + 1 + B + b, 1, sem="release")

    if WRITE_GRAD:  # ---- grad phase, LAG chunks behind
        if v >= lag:
            c = v - lag
            b = c // n_split
            start = (c % n_split) * CHUNK
            base = b.to(tl.int64) * D
            while tl.atomic_add(sync_ptr + 1 + B + b, 0, sem="acquire") == 0:
                pass
            alpha = tl.load(coef_ptr + 2 * b, cache_modifier=".cg")
            gamma = tl.load(coef_ptr + 2 * b + 1, cache_modifier=".cg")
            l1_scale = l1_weight / (B * D)
            for off in range(0, CHUNK, BLOCK):
                idx = start + off + offs
                ok = idx < D
                s = tl.load(s_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
                t = tl.load(t_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
                d = s - t
                sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                dl1 = tl.where(tl.abs(d) < beta, d * inv_beta, sign)
                g = alpha * t + gamma * s + l1_scale * dl1
                tl.store(grad_ptr + base + idx, g.to(grad_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------
# launcher


def _launch_params(D: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps) for maps of D elements per image."""
    if dispatch.interpreting() and D <= 4096:
        return 128, 512, 4  # several chunks per image even for the tests' tiny maps
    block = 1024
    return block, (8192 if D >= 8192 else triton.cdiv(D, block) * block), 4


def _loss_triton(s, t, cos_weight, l1_weight, beta, write_grad, chunk=None, lag=None):
    """s, t (B, D) contiguous -> (loss (), grad (B, D) or empty, cos (B,))."""
    B, D = s.shape
    block, default_chunk, num_warps = _launch_params(D)
    chunk = chunk or default_chunk
    assert chunk % block == 0, f"chunk {chunk} must be a multiple of block {block}"
    n_split = triton.cdiv(D, chunk)
    # the grad phase trails the reduce phase by ~4 programs per SM (at least one image): L2 holds LAG chunks
    lag = max(n_split, lag if lag is not None else 4 * dispatch.num_sms(s.device))
    dev = s.device
    grad = dispatch.new_buffer((B, D) if write_grad else (0,), s.dtype, dev)
    partial = dispatch.new_buffer((B * n_split, 4), torch.float32, dev)
    sync = torch.zeros(1 + 2 * B, dtype=torch.int32, device=dev)
    coef = dispatch.new_buffer((B, 2), torch.float32, dev)
    cos = dispatch.new_buffer((B,), torch.float32, dev)
    loss_terms = dispatch.new_buffer((B,), torch.float32, dev)
    n_programs = B * n_split + (lag if write_grad else 0)
    dispatch.launch(
        _distill_loss_kernel,
        lambda meta: (n_programs,),
        s, t, grad, partial, sync, coef, cos, loss_terms,
        B, D, n_split, lag, float(cos_weight), float(l1_weight), float(beta),
        1.0 / beta if beta > 0 else 0.0, COS_EPS,
        configs=[triton.Config({}, num_warps=num_warps, num_stages=1)],
        WRITE_GRAD=write_grad,
        CHUNK=chunk,
        BLOCK=block,
        SPLIT_P2=triton.next_power_of_2(n_split),
    )  # fmt: skip
    return loss_terms.sum(), grad, cos


def _loss_torch(s, t, cos_weight, l1_weight, beta, write_grad):
    """Same outputs in fp32 torch, the gradient by the closed form above (the executable spec)."""
    B, D = s.shape
    sf, tf = s.float(), t.float()
    st = (sf * tf).sum(1)
    ns_raw, nt_raw = sf.norm(dim=1), tf.norm(dim=1)
    ns, nt = ns_raw.clamp_min(COS_EPS), nt_raw.clamp_min(COS_EPS)
    cos = st / (ns * nt)  # (B,)
    loss = cos_weight * (1 - cos).mean() + l1_weight * F.smooth_l1_loss(sf, tf, beta=beta)
    if not write_grad:
        return loss, s.new_empty(0), cos
    alpha = -cos_weight / (B * ns * nt)
    gamma = torch.where(ns_raw > COS_EPS, cos_weight * cos / (B * ns * ns), torch.zeros_like(cos))
    d = sf - tf
    dl1 = torch.where(d.abs() < beta, d / beta if beta > 0 else d, torch.sign(d))
    grad = alpha[:, None] * tf + gamma[:, None] * sf + l1_weight / (B * D) * dl1
    return loss, grad.to(s.dtype), cos


# ----------------------------------------------------------------------------------------------------------
# custom op + autograd


@torch.library.custom_op("sak::distill_loss_fwd", mutates_args=())
def _distill_loss_op(
    student: torch.Tensor,
    target: torch.Tensor,
    cos_weight: float,
    l1_weight: float,
    beta: float,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () fp32, grad w.r.t. student (same shape) or empty, per-image cosines (B,) fp32)."""
    B = student.shape[0]
    s = student.reshape(B, -1).contiguous()  # (B, D)
    t = target.reshape(B, -1).contiguous().to(student.dtype)
    if dispatch.kernel_backend(s, t, dtype=s.dtype) == "triton" and s.numel() > 0:
        loss, grad, cos = _loss_triton(s, t, cos_weight, l1_weight, beta, write_grad)
    else:
        loss, grad, cos = _loss_torch(s, t, cos_weight, l1_weight, beta, write_grad)
    return loss, (grad.reshape(student.shape) if write_grad else grad), cos


@_distill_loss_op.register_fake
def _(student, target, cos_weight, l1_weight, beta, write_grad):
    grad = torch.empty_like(student) if write_grad else student.new_empty(0)
    f32 = torch.float32
    return student.new_empty((), dtype=f32), grad, student.new_empty((student.shape[0],), dtype=f32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad, grad_cos):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss is not None:
        raise RuntimeError("sak::distill_loss_fwd was called with write_grad=False; it has no gradient")
    return (grad_loss * grad).to(grad.dtype), None, None, None, None, None


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

    Triton on CUDA, torch on CPU, or as forced by SAK_KERNELS (see dispatch). Target gets no gradient.
    """
    if student.shape != target.shape:
        raise ValueError(f"student {tuple(student.shape)} and target {tuple(target.shape)} differ in shape")
    write_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _, cos = torch.ops.sak.distill_loss_fwd(
        student, target.detach(), float(cos_weight), float(l1_weight), float(beta), write_grad
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
