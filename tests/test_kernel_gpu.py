"""GPU tier of the kernels (`-m gpu`, run by `make gpu-check` under `timeout`): the training case under
autocast at real shapes, bit-for-bit repeats, and the loss kernel while another stream keeps the GPU busy.

The float64 comparisons at the real shapes are `test_gpu_real_shapes` (adapter) and `test_gpu_target_shapes`
(loss) in the per-op test files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.kernels import dispatch
from sak.kernels.adapter import fused_adapter
from sak.kernels.distill_loss import distill_loss, distill_loss_reference


def triton_library_compilable() -> bool:
    """False without triton, or when it was imported under TRITON_INTERPRET=1 (its library is interpreted)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(dispatch.SUM_COMBINE, JITFunction)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not triton_library_compilable(),
        reason="needs CUDA, and triton imported without TRITON_INTERPRET",
    ),
]


@pytest.fixture
def compiled_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SAK_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    monkeypatch.setattr(dispatch, "strict", True)


def adapter_inputs(C: int, tokens=(128, 577), seed=0):
    """fp32 stream x, z and fp32 parameters (scale (1,)), as the student holds them in training."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    R = C // 4

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).requires_grad_()

    x, z = rand(*tokens, C), rand(*tokens, C, std=0.5)
    params = [rand(R, C, std=C**-0.5), rand(R, std=0.1), rand(C, R, std=R**-0.5), rand(C, std=0.1)]
    return x, z, params, torch.full((1,), 0.7, device="cuda", requires_grad=True)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.dtype == want.dtype and got.shape == want.shape and torch.isfinite(got).all()
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("C", [768, 1024])
def test_adapter_under_autocast_matches_eager_autocast(compiled_triton, C):
    x, z, (wd, bd, wu, bu), scale = adapter_inputs(C)
    leaves = [x, z, wd, bd, wu, bu, scale]
    grad_out = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_adapter(x, wd, bd, wu, bu, scale, z=z)
        u = x + z
        want = u + scale * F.linear(F.gelu(F.linear(u, wd, bd)), wu, bu)
    assert out.dtype == want.dtype == torch.float32
    grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    errors = {"out": rel_err(out, want)}
    errors |= {n: rel_err(a, b) for n, a, b in zip("x z wd bd wu bu scale".split(), grads, want_grads)}
    bad = {k: v for k, v in errors.items() if v > 2e-2}
    assert not bad, f"errors against eager autocast above 2e-2: {bad}"


def test_adapter_and_loss_repeat_bit_for_bit(compiled_triton):
    x, z, params, scale = adapter_inputs(768)
    student = torch.randn(64, 768, 27, 27, device="cuda").requires_grad_()  # (B, C, H, W)
    target = torch.randn(64, 27, 27, 768, device="cuda").bfloat16()

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused_adapter(x, *params, scale, z=z)
        grads = torch.autograd.grad(out.square().mean(), [x, *params, scale])
        loss = distill_loss(student.permute(0, 2, 3, 1), target)
        (grad_s,) = torch.autograd.grad(loss, [student])
        return [out, *grads, loss, grad_s]

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def test_loss_under_contention_from_another_stream(compiled_triton):
    """While a long matmul chain occupies most SMs from another stream, the loss kernels still finish
    (none waits for another program of its launch) and give the same bits as on an idle GPU."""
    B, H, W, C = 128, 64, 64, 768
    student = torch.randn(B, C, H, W, device="cuda").requires_grad_()
    target = (0.5 * student.detach().permute(0, 2, 3, 1) + torch.randn(B, H, W, C, device="cuda")).bfloat16()

    def loss_and_grad():
        loss = distill_loss(student.permute(0, 2, 3, 1), target)
        return loss, torch.autograd.grad(loss, [student])[0]

    idle = loss_and_grad()
    torch.cuda.synchronize()
    busy = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    busy.wait_stream(torch.cuda.current_stream())  # `a` is ready before the busy stream reads it
    with torch.cuda.stream(busy):
        for _ in range(40):  # a few hundred ms of matmuls, queued before the loss below
            a = (a @ a).clamp_(-1, 1)
    results = [loss_and_grad() for _ in range(5)]  # on the default stream, overlapping the matmuls
    torch.cuda.synchronize()
    for loss, grad in results:
        assert torch.equal(loss, idle[0]) and torch.equal(grad, idle[1])
    ref = distill_loss_reference(student.double().permute(0, 2, 3, 1), target.double())
    assert abs(idle[0].item() - ref.item()) <= 1e-5 * abs(ref.item())
