"""Fused adapter: Triton (CPU interpreter here, GPU with -m gpu) and torch paths against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.kernels import adapter, dispatch
from sak.kernels.adapter import adapter_reference, fused_adapter

# Max error relative to the reference tensor's max magnitude. fp32 dots run IEEE; fp16/bf16 round u, h,
# gelu(h), the output and every stored gradient to the input dtype, like eager PyTorch would (measured:
# fp32 <= 5e-7, fp16 <= 7e-4, bf16 <= 1.3e-2). The interpreter rounds fp32 -> bf16 by truncation where the
# GPU rounds to nearest, so bf16 errors here reach one ulp (2^-8) rather than half of one.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
TOKENS = (2, 37)  # 74 tokens: not a multiple of any block size used


@pytest.fixture
def interpreted_triton(monkeypatch):
    """Force the Triton path on CPU tensors through the interpreter; poison every output buffer."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SAK_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "poison_outputs", True)


def make_inputs(C, dtype, with_z, scale_shape=(), device="cpu", tokens=TOKENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = C // 4

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()

    x = rand(*tokens, C)
    z = rand(*tokens, C, std=0.5) if with_z else None
    w_down, b_down = rand(R, C, std=C**-0.5), rand(R, std=0.1)
    w_up, b_up = rand(C, R, std=R**-0.5), rand(C, std=0.1)
    scale = torch.full(scale_shape, 0.7, device=device).requires_grad_()  # fp32 parameter, like the model's
    return x, z, w_down, b_down, w_up, b_up, scale


def check_against_float64(inputs, dtype, seed=1):
    """Run fused_adapter and its float64 reference; assert output and every gradient within TOL[dtype]."""
    x, z, w_down, b_down, w_up, b_up, scale = inputs
    out = fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=z)
    assert out.dtype == dtype and out.shape == x.shape
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    out.backward(grad_out)

    leaves = [t for t in inputs if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_inputs = iter(ref_leaves)
    rx, rz, rwd, rbd, rwu, rbu, rs = (next(ref_inputs) if t is not None else None for t in inputs)
    ref = adapter_reference(rx, rwd, rbd, rwu, rbu, rs, z=rz)
    ref.backward(grad_out.double())

    def rel_err(got, want):
        assert got is not None and got.shape == want.shape and torch.isfinite(got).all()
        return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    errors = {"out": rel_err(out, ref)}
    names = ["x", "z", "w_down", "b_down", "w_up", "b_up", "scale"]
    for name, leaf, ref_leaf in zip([n for n, t in zip(names, inputs) if t is not None], leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        errors[name] = rel_err(leaf.grad, ref_leaf.grad)
    # dscale = sum(grad_out * y) over all outputs cancels heavily: measure its error against sum(|grad_out * y|)
    with torch.no_grad():
        u = rx if rz is None else rx + rz
        y = F.linear(F.gelu(F.linear(u, rwd, rbd)), rwu, rbu)  # (..., C), the branch scale multiplies
        scale_err = (inputs[-1].grad.double() - rs.grad).abs().item()
        errors["scale"] = scale_err / (grad_out.double() * y).abs().sum().item()
    bad = {k: v for k, v in errors.items() if v > TOL[dtype]}
    assert not bad, f"errors above {TOL[dtype]:g}: {bad}"
    return errors


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [384, 768, 1024, 200])
def test_triton_matches_float64(interpreted_triton, C, dtype):
    check_against_float64(make_inputs(C, dtype, with_z=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_with_z_and_vector_scale(interpreted_triton, dtype):
    # z (the per-level input added to the residual stream) gets the same gradient as x
    inputs = make_inputs(200, dtype, with_z=True, scale_shape=(1,))
    check_against_float64(inputs, dtype)
    x, z, *_, scale = inputs
    assert torch.equal(x.grad, z.grad)
    assert scale.grad.shape == (1,)


def test_torch_path_matches_float64(monkeypatch):
    monkeypatch.delenv("SAK_KERNELS", raising=False)
    check_against_float64(make_inputs(200, torch.float32, with_z=True), torch.float32)


def test_saves_h_only_when_needed(interpreted_triton):
    x, z, w_down, b_down, w_up, b_up, scale = make_inputs(64, torch.float32, with_z=True)
    out, h = torch.ops.sak.adapter_fwd(x, z, w_down, b_down, w_up, b_up, scale, True)
    want_h = torch.nn.functional.linear((x + z).reshape(-1, 64), w_down, b_down)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out2, h2 = torch.ops.sak.adapter_fwd(x, z, w_down, b_down, w_up, b_up, scale, False)
        assert h2.numel() == 0
        torch.testing.assert_close(out2, out)
        assert not fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=z).requires_grad


def test_weights_in_other_dtype_get_grads_in_their_dtype(interpreted_triton):
    x, _, w_down, b_down, w_up, b_up, scale = make_inputs(64, torch.float32, with_z=False)
    x16 = x.detach().bfloat16().requires_grad_()
    fused_adapter(x16, w_down, b_down, w_up, b_up, scale).float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and w_down.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(monkeypatch, backend):
    monkeypatch.setenv("SAK_KERNELS", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, z, w_down, b_down, w_up, b_up, scale = make_inputs(64, torch.float32, with_z=True, tokens=(1, 19))
    torch.library.opcheck(torch.ops.sak.adapter_fwd, (x, z, w_down, b_down, w_up, b_up, scale, True))
    torch.library.opcheck(torch.ops.sak.adapter_fwd, (x, None, w_down, b_down, w_up, b_up, scale, True))
    with torch.no_grad():
        _, h = torch.ops.sak.adapter_fwd(x, z, w_down, b_down, w_up, b_up, scale, True)
    bwd_args = [t.detach() for t in (torch.randn_like(x), x, z, h, w_down, w_up, b_up, scale)]
    torch.library.opcheck(torch.ops.sak.adapter_bwd, tuple(bwd_args))  # no double backward


def recording_aot_backend(seen: list[str]):
    """torch.compile backend that records the ops of the AOT forward and backward graphs, then runs them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def test_compiled_graph_keeps_the_ops():
    seen = []
    inputs = make_inputs(64, torch.float32, with_z=True)
    x, z, w_down, b_down, w_up, b_up, scale = inputs
    fn = torch.compile(fused_adapter, backend=recording_aot_backend(seen), fullgraph=True)
    out = fn(x, w_down, b_down, w_up, b_up, scale, z=z)
    out.sum().backward()
    torch.testing.assert_close(out, fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=z))
    assert "sak.adapter_fwd.default" in seen and "sak.adapter_bwd.default" in seen
    assert all(t.grad is not None for t in inputs)


@pytest.mark.slow
def test_inductor_compile_fwd_bwd():
    inputs = make_inputs(64, torch.float32, with_z=True)
    x, z, w_down, b_down, w_up, b_up, scale = inputs
    compiled = torch.compile(fused_adapter, fullgraph=True)
    compiled(x, w_down, b_down, w_up, b_up, scale, z=z).sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=z).sum().backward()
    for got, t in zip(grads, inputs):
        torch.testing.assert_close(got, t.grad)


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("SAK_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.kernel_backend(cpu, None) == "torch"  # CPU default, interpreter or not
    monkeypatch.setenv("SAK_KERNELS", "triton")
    assert dispatch.kernel_backend(cpu) == "triton"
    monkeypatch.setenv("SAK_KERNELS", "torch")
    assert dispatch.kernel_backend(cpu) == "torch"
    monkeypatch.setenv("SAK_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.kernel_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64"):
        dispatch.kernel_backend(cpu, dtype=torch.float64)
    monkeypatch.setenv("SAK_KERNELS", "auto")
    assert dispatch.kernel_backend(cpu, dtype=torch.float64) == "torch"
    monkeypatch.setenv("SAK_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SAK_KERNELS"):
        dispatch.kernel_backend(cpu)


def test_rejects_wide_bottleneck(interpreted_triton):
    x, _, w_down, b_down, w_up, b_up, scale = make_inputs(1040, torch.float32, with_z=False, tokens=(1, 4))
    with pytest.raises(ValueError, match="bottleneck"):
        fused_adapter(x, w_down, b_down, w_up, b_up, scale)


# ---- compile for an H100 (sm_90) without a GPU: what the interpreter cannot catch


@pytest.fixture
def sm90_compile(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    if not triton_library_compilable():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreted, not compilable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def adapter_kernel_builds(dtype):
    """(kernel, example args, constexprs, configs) of the three adapter kernels at ViT-B sizes."""
    M, C, R = 577, 768, 192

    def t(dt=dtype):
        return torch.empty(1, dtype=dt)

    f32 = torch.float32
    common = dict(DOT_DTYPE=dispatch.dot_dtype(dtype), DOT_PRECISION=dispatch.dot_precision(dtype))
    fwd = dict(x_ptr=t(), z_ptr=t(), wd_ptr=t(), bd_ptr=t(), wu_ptr=t(), bu_ptr=t(), scale_ptr=t(f32))
    fwd.update(out_ptr=t(), h_ptr=t(), M=M, C=C, R=R)
    bwd = dict(g_ptr=t(), h_ptr=t(), wd_ptr=t(), wu_ptr=t(), scale_ptr=t(f32), du_ptr=t(), dh_ptr=t())
    bwd.update(gsum_ptr=t(f32), dhsum_ptr=t(f32), dscale_ptr=t(f32), M=M, C=C, R=R)
    reduce = dict(a_ptr=t(), b_ptr=t(), b2_ptr=t(), out_ptr=t(f32), M=M, NI=C, NJ=R, tokens_per_split=4096)
    block_i, block_j, block_k = (64, 64, 32) if dtype == f32 else (64, 64, 64)
    return [
        (adapter._adapter_fwd_kernel, fwd, dict(HAS_Z=True, SAVE_H=True, BLOCK_R=256, **common), "fwd"),
        (
            adapter._adapter_bwd_tokens_kernel,
            bwd,
            dict(BLOCK_M=adapter._bwd_block_m(dtype), BLOCK_R=256, **common),
            "bwd",
        ),
        (
            adapter._token_reduce_kernel,
            reduce,
            dict(GELU_B=True, HAS_B2=True, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k, **common),
            "reduce",
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)  # every dtype and config: the slow test below
def test_kernels_compile_for_h100(sm90_compile, dtype):
    for fn, args, constexprs, kind in adapter_kernel_builds(dtype):
        config = adapter._configs(kind, dtype)[0]
        assert dispatch.compile_only(fn, args, constexprs, config).asm["cubin"], fn.__name__


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_every_gpu_config_compiles_for_h100(sm90_compile, dtype):
    for fn, args, constexprs, kind in adapter_kernel_builds(dtype):
        for config in adapter._configs(kind, dtype):
            assert dispatch.compile_only(fn, args, constexprs, config).asm["cubin"], (fn.__name__, config)


# ---- GPU tier: the real shapes, compiled kernels (no interpreter)


def triton_library_compilable() -> bool:
    """False without triton, or when it was imported under TRITON_INTERPRET=1 (its library is interpreted)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(dispatch.SUM_COMBINE, JITFunction)


gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_library_compilable(),
    reason="needs CUDA, and triton imported without TRITON_INTERPRET",
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("C", [768, 1024])
def test_gpu_real_shapes(monkeypatch, C, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SAK_KERNELS", raising=False)  # CUDA default: Triton
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    inputs = make_inputs(C, dtype, with_z=True, device="cuda", tokens=(128, 577))
    assert dispatch.kernel_backend(inputs[0]) == "triton"
    check_against_float64(inputs, dtype)
