"""Fused adapter bottleneck: out = u + scale * (gelu(u @ w_down.T + b_down) @ w_up.T + b_up), u = x (+ z).

Shapes: x, z (..., C) tokens, flattened here to (M, C); w_down (R, C) and w_up (C, R) like nn.Linear
weights; b_down (R,), b_up (C,); scale a 0-d or 1-element tensor. All dots accumulate in fp32.
Two dtypes: x's (u, the residual add, the output, the grads of x and z) and the matmul dtype MM, the
weights' dtype (x's own, or the autocast dtype: `fused_adapter` casts the weights as autocast would).
Every matmul operand is rounded to MM, and h, gelu(h), y and the matmul grads are rounded to MM where
eager autocast rounds them, so the op returns what the eager module returns under autocast.

Forward (`adapter_triton.adapter_fwd_kernel`, one program per BLOCK_M tokens):
    phase 1  h = MM(u) @ w_down.T + b_down     (BLOCK_M, BLOCK_R) fp32 over the C loop, then rounded to MM
    phase 2  a = MM(gelu(h))                   (what eager feeds the next matmul)
             y = MM(a @ w_up[c].T + b_up[c]); out[:, c] = u[:, c] + scale * y for each C chunk (u re-read)
The bottleneck activation never goes to global memory, except that h itself (M, R) is stored when a
backward will follow (`save_h`).

Backward STORES h rather than recomputing it: recomputing needs u @ w_down.T again, i.e. re-reading the
whole (M, C) input (C = 4R), while storing costs one write plus one read of the (M, R) tensor: about half the
bytes and none of the FLOPs. h is stored in MM, the precision eager PyTorch saves it in.
Under `torch.no_grad()` (or when nothing requires grad) nothing is stored.

Backward (`adapter_triton.adapter_bwd_tokens_kernel`, one program per BLOCK_M tokens, then two reduction GEMMs):
    gw  = MM(g) @ w_up                          (BLOCK_M, R)   g = grad of out
    dh  = MM(scale * gw) * gelu'(h)             stored (M, R) in MM for the weight gradient
    du  = g + MM(MM(dh) @ w_down)               (M, C) = grad of x (and of z)
    per-tile partial sums: colsum(g) (-> b_up, scale), colsum(dh) (-> b_down), sum(gelu(h) * gw) (-> scale)
    dw_up   = scale * g.T @ gelu(h)             `token_reduce_kernel`, gelu applied while loading h
    dw_down = dh.T @ u                          `token_reduce_kernel`, u = x + z formed while loading
    dscale  = sum(gelu(h) * gw) + colsum(g) . b_up
The two weight gradients are sums over all M tokens: a split-K Triton GEMM writes fp32 partials per split
(deterministic, no atomics) that torch sums.

fp32 inputs: tl.dot runs IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 is set (dispatch.dot_precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sak.kernels import dispatch
from sak.kernels.adapter_triton import INV_SQRT_2PI, MAX_BOTTLENECK, SQRT1_2, bwd_triton, fwd_triton

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
            lambda: fwd_triton(x2, z2, *args, scale1, save_h),
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
            lambda: bwd_triton(g, x2, z2, h, wd, wu, bu, scale.reshape(1).contiguous()),
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
