"""Fused adapter: Triton (CPU interpreter here, GPU with -m gpu) and torch paths against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sak.kernels import adapter, adapter_triton, dispatch
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
    monkeypatch.setattr(dispatch, "strict", True)


def make_inputs(C, dtype, with_z, scale_shape=(), device="cpu", tokens=TOKENS, seed=0):
    # drawn on `device` itself: at the GPU tier's real shapes a host tensor would cost seconds to make and copy
    g = torch.Generator(device=device).manual_seed(seed)
    R = C // 4

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype=dtype).requires_grad_()

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
    gen = torch.Generator(device=out.device).manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, device=out.device).to(out)
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


def test_wide_bottleneck_falls_back_to_torch_with_one_warning(interpreted_triton, monkeypatch):
    # r = 260 > 256: the Triton path refuses it; outside strict mode the op runs on torch and says so once
    monkeypatch.setattr(dispatch, "strict", False)
    monkeypatch.setattr(dispatch, "_FAILED", {})
    inputs = make_inputs(1040, torch.float32, with_z=False, tokens=(1, 4))
    x, _, w_down, b_down, w_up, b_up, scale = inputs
    with pytest.warns(RuntimeWarning, match="bottleneck 260 > 256") as record:
        out = fused_adapter(x, w_down, b_down, w_up, b_up, scale)
        out.sum().backward()
        fused_adapter(x, w_down, b_down, w_up, b_up, scale)  # same shape again: no second warning
    assert len([w for w in record if "fwd" in str(w.message)]) == 1
    torch.testing.assert_close(out, adapter_reference(x, w_down, b_down, w_up, b_up, scale))
    assert any("adapter_fwd" in k for k in dispatch.triton_failures())


def test_compile_error_falls_back_to_torch(interpreted_triton, monkeypatch):
    from triton.compiler.errors import CompilationError

    def broken(*args, **kwargs):
        raise CompilationError("kernel source", None, "a stand-in for a compile failure on this GPU")

    monkeypatch.setattr(dispatch, "strict", False)
    monkeypatch.setattr(dispatch, "_FAILED", {})
    monkeypatch.setattr(adapter, "fwd_triton", broken)  # the launcher adapter.py calls
    inputs = make_inputs(64, torch.float32, with_z=True)
    x, z, w_down, b_down, w_up, b_up, scale = inputs
    with pytest.warns(RuntimeWarning, match="CompilationError"):
        out = fused_adapter(x, w_down, b_down, w_up, b_up, scale, z=z)
    torch.testing.assert_close(out, adapter_reference(x, w_down, b_down, w_up, b_up, scale, z=z))


# ---- autocast: the op follows torch.autocast like the eager module it replaces


def eager_module_math(x, z, w_down, b_down, w_up, b_up, scale):
    """student.model's eager adapter: u + scale * up(GELU(down(u))), scale a (1,) fp32 parameter."""
    u = x if z is None else x + z
    return u + scale * F.linear(F.gelu(F.linear(u, w_down, b_down)), w_up, b_up)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_z", [False, True], ids=["x", "x+z"])
def test_autocast_bf16_matches_eager_autocast(interpreted_triton, monkeypatch, backend, with_z):
    """Training's case: fp32 stream and parameters under bf16 autocast. The op sees bf16 as its matmul
    dtype (h saved in bf16), returns fp32 like eager, and output and every gradient match eager autocast."""
    monkeypatch.setenv("SAK_KERNELS", backend)
    inputs = make_inputs(200, torch.float32, with_z=with_z, scale_shape=(1,))
    leaves = [t for t in inputs if t is not None]
    seen = []
    real_fwd = torch.ops.sak.adapter_fwd

    def spy(*args):
        out, h = real_fwd(*args)
        seen.append((args[0].dtype, args[2].dtype, out.dtype, h.dtype))
        return out, h

    monkeypatch.setattr(torch.ops.sak, "adapter_fwd", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_adapter(*inputs[:1], *inputs[2:], z=inputs[1])
        want = eager_module_math(*inputs)
    f32, bf16 = torch.float32, torch.bfloat16
    assert seen == [(f32, bf16, f32, bf16)], seen  # x fp32, weights bf16 (autocast's), out fp32, h bf16
    assert out.dtype == want.dtype == f32
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)

    def rel_err(got, ref):
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.isfinite(got).all()
        return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()

    names = [
        n for n, t in zip(["x", "z", "w_down", "b_down", "w_up", "b_up", "scale"], inputs) if t is not None
    ]
    errors = {"out": rel_err(out, want)} | {n: rel_err(g, w) for n, g, w in zip(names, grads, want_grads)}
    # bf16 tolerance: both round h, GELU(h), y and the matmul grads to bf16 at the same points
    bad = {k: v for k, v in errors.items() if v > TOL[torch.bfloat16]}
    assert not bad, f"errors above {TOL[torch.bfloat16]:g} against eager autocast: {bad}"
    if backend == "torch":  # (the interpreter truncates to bf16 where torch rounds to nearest: up to 1 ulp)
        # the rounding points are eager's: far closer to eager autocast than fp32 math (autocast off) is
        fp32_out = eager_module_math(*inputs)
        assert rel_err(out, want) < 0.1 * rel_err(fp32_out, want)


def test_autocast_off_inside_autocast_region_keeps_fp32(interpreted_triton):
    inputs = make_inputs(64, torch.float32, with_z=False, scale_shape=(1,))
    x, _, *params = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        assert adapter.matmul_dtype(x) == torch.float32
        out = fused_adapter(x, *params)
    torch.testing.assert_close(out, eager_module_math(x, None, *params), rtol=1e-5, atol=1e-5)


# ---- compile for an H100 (sm_90) without a GPU: what the interpreter cannot catch


@pytest.fixture
def sm90_compile(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    if not triton_library_compilable():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreted, not compilable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def adapter_kernel_builds(io_dtype, mm_dtype, C=768):
    """(kernel, real launch args, constexprs, kind) of the three adapter kernels for 128 x 577 tokens of width
    C; io_dtype is x's dtype, mm_dtype the matmul dtype (fp32 x with bf16 matmuls under autocast)."""
    M, R = 128 * 577, C // 4

    def t(dt):
        return torch.empty(1, dtype=dt)

    f32, io, mm = torch.float32, io_dtype, mm_dtype
    common = dict(
        MM_DTYPE=dispatch.tl_dtype(mm),
        DOT_DTYPE=dispatch.dot_dtype(mm),
        DOT_PRECISION=dispatch.dot_precision(mm),
    )
    fwd = dict(x_ptr=t(io), z_ptr=t(io), wd_ptr=t(mm), bd_ptr=t(mm), wu_ptr=t(mm), bu_ptr=t(mm))
    fwd.update(scale_ptr=t(f32), out_ptr=t(io), h_ptr=t(mm), M=M, C=C, R=R)
    bwd = dict(g_ptr=t(io), h_ptr=t(mm), wd_ptr=t(mm), wu_ptr=t(mm), scale_ptr=t(f32), du_ptr=t(io))
    bwd.update(dh_ptr=t(mm), gsum_ptr=t(f32), dhsum_ptr=t(f32), dscale_ptr=t(f32), M=M, C=C, R=R)
    block_i, block_j, block_k = adapter_triton.reduce_blocks(mm)
    tokens_per_split = 4096  # as _token_reduce picks for 132 SMs at these sizes (a multiple of BLOCK_K)
    # dw_up = g.T @ gelu(h): a = g (M, C), b = h (M, R)
    reduce_up = dict(a_ptr=t(io), b_ptr=t(mm), b2_ptr=t(mm), out_ptr=t(f32), M=M, NI=C, NJ=R)
    reduce_up.update(tokens_per_split=tokens_per_split)
    # dw_down = dh.T @ (x + z): a = dh (M, R), b = x, b2 = z (M, C)
    reduce_down = dict(a_ptr=t(mm), b_ptr=t(io), b2_ptr=t(io), out_ptr=t(f32), M=M, NI=R, NJ=C)
    reduce_down.update(tokens_per_split=tokens_per_split)
    blocks = dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k, **common)
    block_r = adapter_triton.bottleneck_block(R)
    return [
        (
            adapter_triton.adapter_fwd_kernel,
            fwd,
            dict(HAS_Z=True, SAVE_H=True, BLOCK_R=block_r, **common),
            "fwd",
        ),
        (
            adapter_triton.adapter_bwd_tokens_kernel,
            bwd,
            dict(BLOCK_M=adapter_triton.bwd_block_m(mm), BLOCK_R=block_r, **common),
            "bwd",
        ),
        (adapter_triton.token_reduce_kernel, reduce_up, dict(GELU_B=True, HAS_B2=False, **blocks), "reduce"),
        (
            adapter_triton.token_reduce_kernel,
            reduce_down,
            dict(GELU_B=False, HAS_B2=True, **blocks),
            "reduce",
        ),
    ]


DTYPE_PAIRS = [
    (torch.float32, torch.bfloat16),  # training: fp32 stream under bf16 autocast
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
]


def test_kernels_compile_for_h100(sm90_compile):
    # the training case; every dtype pair, config and width in the slow test below
    for fn, args, constexprs, kind in adapter_kernel_builds(torch.float32, torch.bfloat16):
        config = adapter_triton.kernel_configs(kind, torch.bfloat16)[0]
        assert dispatch.compile_only(fn, args, constexprs, config).asm["cubin"], fn.__name__


@pytest.mark.slow
@pytest.mark.parametrize("C", [768, 1024])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
def test_every_gpu_config_compiles_for_h100_without_spills(sm90_compile, dtypes, C):
    """Every config the autotuner may pick, compiled as the runtime specialises the real launch: no spills."""
    spilling = []
    for fn, args, constexprs, kind in adapter_kernel_builds(*dtypes, C=C):
        for config in adapter_triton.kernel_configs(kind, dtypes[1]):
            regs, spills = dispatch.register_spills(dispatch.compile_only(fn, args, constexprs, config))
            if spills:
                spilling.append(f"{fn.__name__} {config}: {spills} bytes ({regs} registers)")
    assert not spilling, "\n".join(spilling)


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
    monkeypatch.setattr(dispatch, "strict", True)  # a failing kernel fails the test, no quiet fallback
    inputs = make_inputs(C, dtype, with_z=True, device="cuda", tokens=(128, 577))
    assert dispatch.kernel_backend(inputs[0]) == "triton"
    check_against_float64(inputs, dtype)
