"""Fused distillation loss: Triton (CPU interpreter here, GPU with -m gpu) and torch paths vs float64."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from sak.kernels import dispatch
from sak.kernels import distill_loss as loss_module
from sak.kernels.distill_loss import distill_loss, distill_loss_reference

# Loss and cosines accumulate in fp32 from the same input values as the float64 reference, so they are
# tight for every dtype; the gradient is stored in the student's dtype (max error relative to its max
# magnitude: one ulp, the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest).
LOSS_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def interpreted_triton(monkeypatch):
    """Force the Triton path on CPU tensors through the interpreter; poison every output buffer."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SAK_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    monkeypatch.setattr(dispatch, "strict", True)


def make_pair(shape, dtype, device="cpu", seed=0):
    """Student and a correlated target (cosines well inside (-1, 1))."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host tensors at real sizes
    student = torch.randn(shape, generator=g, device=device)
    target = 0.6 * student + torch.randn(shape, generator=g, device=device)
    return student.to(dtype).requires_grad_(), target.to(dtype)


def check_against_float64(student, target, dtype, grad_scale=1.0, **kwargs):
    loss, cos = distill_loss(student, target, return_cosines=True, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == () and cos.shape == (student.shape[0],)
    assert not cos.requires_grad
    (grad_scale * loss).backward()

    ref_student = student.detach().double().requires_grad_()
    ref_loss, ref_cos = distill_loss_reference(ref_student, target.double(), return_cosines=True, **kwargs)
    (grad_scale * ref_loss).backward()

    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL * abs(ref_loss.item())
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0, atol=LOSS_TOL)
    grad = student.grad
    assert grad.dtype == dtype and grad.shape == student.shape and torch.isfinite(grad).all()
    err = ((grad.double() - ref_student.grad).abs().max() / ref_student.grad.abs().max()).item()
    assert err <= GRAD_TOL[dtype], f"grad error {err:.2e} > {GRAD_TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(3, 5, 7, 40), (2, 10), (4, 9, 9, 24)],  # 1400 = 2.7 chunks, one partial chunk, 1944 = 3.8 chunks
    ids=lambda s: "x".join(map(str, s)),
)
def test_triton_matches_float64(interpreted_triton, shape, dtype):
    check_against_float64(*make_pair(shape, dtype), dtype)


@pytest.mark.parametrize("beta", [0.0, 0.25, 2.0])
def test_weights_and_beta(interpreted_triton, beta):
    # beta = 0 is the pure L1 loss; grad_scale checks backward multiplies by grad_output
    student, target = make_pair((3, 6, 50), torch.float32)
    check_against_float64(
        student, target, torch.float32, grad_scale=3.0, cos_weight=0.3, l1_weight=2.0, beta=beta
    )


def test_torch_path_matches_float64(monkeypatch):
    monkeypatch.delenv("SAK_KERNELS", raising=False)
    check_against_float64(*make_pair((3, 5, 7, 40), torch.bfloat16), torch.bfloat16)


def test_matches_cosine_similarity_and_smooth_l1():
    student, target = make_pair((4, 3, 8), torch.float64)
    loss, cos = distill_loss_reference(student, target, return_cosines=True)
    s, t = student.flatten(1), target.flatten(1)
    want_cos = F.cosine_similarity(s, t, dim=1, eps=1e-8)
    torch.testing.assert_close(cos, want_cos)
    torch.testing.assert_close(loss, 0.9 * (1 - want_cos).mean() + 0.1 * F.smooth_l1_loss(s, t))


@pytest.mark.parametrize("rows", [None, 2, 8])
def test_chunk_size_and_program_order_do_not_change_results(interpreted_triton, rows):
    # 7 images x 40 positions x 24 channels; rows=2: 20 chunks per image, 140 programs. The old design
    # (ready flags, lag >= chunks per image) had every grad program wait on an image's last chunk; here the
    # chunks run in reverse order too and every result is bit-identical (fixed summation order).
    student, target = make_pair((7, 5, 8, 24), torch.float32)
    s = student.detach()
    want = loss_module._fwd_triton(s, target, 0.9, 0.1, 1.0)
    grad_loss = torch.tensor(1.5)
    want_grad = loss_module._bwd_triton(grad_loss, s, target, want[2], 0.1, 1.0)
    for reverse in (False, True):
        got = loss_module._fwd_triton(s, target, 0.9, 0.1, 1.0, rows=rows, reverse=reverse)
        got_grad = loss_module._bwd_triton(grad_loss, s, target, got[2], 0.1, 1.0, rows=rows, reverse=reverse)
        if rows is None:  # same chunking: same bits, whatever the program order
            for a, b in zip((*got, got_grad), (*want, want_grad)):
                assert torch.equal(a, b)
        else:
            for a, b in zip((*got, got_grad), (*want, want_grad)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ref_loss = distill_loss_reference(student.double(), target.double())
    assert abs(want[0].item() - ref_loss.item()) <= LOSS_TOL * ref_loss.item()


def test_many_images_and_chunks_in_reverse_program_order(interpreted_triton):
    """Where the old kernel had to wait: 32 images x 12 chunks (384 programs), finalised by another launch."""
    student, target = make_pair((32, 24, 16), torch.float32, seed=3)
    s = student.detach()
    loss, cos, coef = loss_module._fwd_triton(s, target, 0.9, 0.1, 1.0, rows=2, reverse=True)
    grad = loss_module._bwd_triton(torch.tensor(2.0), s, target, coef, 0.1, 1.0, rows=2, reverse=True)
    assert loss_module._Launch(s, target, rows=2).n_split == 12
    ref_s = s.double().requires_grad_()
    ref_loss, ref_cos = distill_loss_reference(ref_s, target.double(), return_cosines=True)
    (2.0 * ref_loss).backward()
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL * ref_loss.item()
    torch.testing.assert_close(cos.double(), ref_cos, rtol=0, atol=LOSS_TOL)
    torch.testing.assert_close(grad.double(), ref_s.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_strided_student_and_stored_target_dtype_without_copies(
    interpreted_triton, monkeypatch, target_dtype
):
    # the trainer's case: a permuted (B, H, W, C) view of a channels-first fp32 student map, and the target
    # in the dtype the cache stores; the op must read both in place (no .contiguous(), no cast)
    g = torch.Generator().manual_seed(5)
    bchw = torch.randn(3, 24, 5, 7, generator=g).requires_grad_()  # (B, C, H, W)
    student = bchw.permute(0, 2, 3, 1)  # (B, H, W, C) view
    target = (0.5 * student.detach() + torch.randn(3, 5, 7, 24, generator=g)).to(target_dtype)
    copies = []
    with pytest.MonkeyPatch.context() as mp:  # count every copy of a tensor bigger than a few elements
        for name in ("contiguous", "to"):
            original = getattr(torch.Tensor, name)

            def counting(self, *args, _original=original, _name=name, **kwargs):
                out = _original(self, *args, **kwargs)
                if out.data_ptr() != self.data_ptr() and self.numel() > 1000:
                    copies.append(_name)
                return out

            mp.setattr(torch.Tensor, name, counting)
        loss, cos = distill_loss(student, target, return_cosines=True)
        loss.backward()
    assert not copies, f"the op copied its inputs: {copies}"
    assert bchw.grad.is_contiguous()
    # the gradient comes out in the strides the fake (empty_like) promises torch.compile, on both paths
    for backend in ("triton", "torch"):
        monkeypatch.setenv("SAK_KERNELS", backend)
        _, _, coef = torch.ops.sak.distill_loss_fwd(student.detach(), target, 0.9, 0.1, 1.0)
        grad = torch.ops.sak.distill_loss_bwd(torch.tensor(1.0), student.detach(), target, coef, 0.1, 1.0)
        assert grad.stride() == torch.empty_like(student).stride() == student.stride()
    ref_s = bchw.detach().double().requires_grad_()
    ref_loss = distill_loss_reference(ref_s.permute(0, 2, 3, 1), target.double())
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL * ref_loss.item()
    torch.testing.assert_close(bchw.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-8)


def test_zero_image_and_target_get_clamped_norms(interpreted_triton):
    student, target = make_pair((3, 4, 33), torch.float32)
    with torch.no_grad():
        student[1] = 0.0  # norm clamps to eps: cos = 0, no gradient through the norm
        target[2] = 0.0
    check_against_float64(student, target, torch.float32)


def test_target_gets_no_gradient_and_no_grad_mode(interpreted_triton):
    student, target = make_pair((2, 300), torch.float32)
    target.requires_grad_()
    distill_loss(student, target).backward()
    assert target.grad is None and student.grad is not None
    with torch.no_grad():  # forward only: no backward launch
        loss = distill_loss(student, target)
    assert loss.item() == pytest.approx(distill_loss_reference(student, target).item(), rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(monkeypatch, backend):
    monkeypatch.setenv("SAK_KERNELS", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    student, target = make_pair((3, 4, 50), torch.float32)
    torch.library.opcheck(torch.ops.sak.distill_loss_fwd, (student, target, 0.9, 0.1, 1.0))
    torch.library.opcheck(
        torch.ops.sak.distill_loss_fwd, (student.detach(), target.bfloat16(), 0.9, 0.1, 1.0)
    )
    _, _, coef = torch.ops.sak.distill_loss_fwd(student.detach(), target, 0.9, 0.1, 1.0)
    bwd_args = (torch.tensor(0.7), student.detach(), target, coef, 0.1, 1.0)
    torch.library.opcheck(torch.ops.sak.distill_loss_bwd, bwd_args)


def recording_aot_backend(seen: list[str]):
    """torch.compile backend that records the ops of the AOT forward and backward graphs, then runs them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def test_compiled_graph_keeps_the_op():
    seen = []
    student, target = make_pair((3, 4, 50), torch.float32)
    fn = torch.compile(distill_loss, backend=recording_aot_backend(seen), fullgraph=True)
    fn(student, target).backward()
    assert "sak.distill_loss_fwd.default" in seen and "sak.distill_loss_bwd.default" in seen
    torch.testing.assert_close(
        student.grad, torch.autograd.grad(distill_loss_reference(student, target), student)[0]
    )


def loss_kernel_builds(shape, student_dtype, target_dtype):
    """(kernel, real launch args, constexprs, config) of the three loss kernels for the trainer's case: a
    permuted channels-first student map and a contiguous cached target of `shape` (B, H, W, C)."""
    B, H, W, C = shape
    student = torch.empty(B, C, H, W, dtype=student_dtype).permute(0, 2, 3, 1)  # strides only, never filled
    target = torch.empty(shape, dtype=target_dtype)
    lc = loss_module._Launch(student, target)
    f32 = torch.float32
    common = dict(P=lc.P, C=lc.C, n_split=lc.n_split, n_chunks=lc.n_chunks)
    common.update(zip(("ssb", "ssp", "ssc"), lc.s.stride()))
    common.update(zip(("stb", "stp", "stc"), lc.t.stride()))
    partial = dict(
        s_ptr=lc.s, t_ptr=lc.t, partial_ptr=torch.empty(1, dtype=f32), **common, beta=1.0, inv_beta=1.0
    )
    grad = dict(grad_loss_ptr=torch.empty(1, dtype=f32), coef_ptr=torch.empty(1, dtype=f32), s_ptr=lc.s)
    grad.update(t_ptr=lc.t, g_ptr=lc.s, **common, l1_scale=1e-9, beta=1.0, inv_beta=1.0)
    finalize = dict(partial_ptr=torch.empty(1, dtype=f32), coef_ptr=torch.empty(1, dtype=f32))
    finalize.update(cos_ptr=torch.empty(1, dtype=f32), loss_ptr=torch.empty(1, dtype=f32), B=B)
    finalize.update(n_split=lc.n_split, n_chunks=lc.n_chunks, cos_weight=0.9, l1_weight=0.1, inv_b=1 / B)
    finalize.update(inv_numel=1e-9, eps=1e-8)
    blocks = loss_module._finalize_blocks(lc)
    config = loss_module._config()[0]
    return [
        (loss_module._loss_partial_kernel, partial, lc.constexprs(False), config),
        (loss_module._loss_finalize_kernel, finalize, blocks, config),
        (loss_module._loss_grad_kernel, grad, lc.constexprs(False), config),
    ]


@pytest.fixture
def sm90_compile(monkeypatch, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    if not triton_library_compilable():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreted, not compilable")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def test_kernels_compile_for_h100(sm90_compile):
    """Compile for sm_90 as the runtime specialises the real launch: no atomics, no spin, no spills."""
    for fn, args, constexprs, config in loss_kernel_builds((128, 27, 27, 768), torch.float32, torch.bfloat16):
        compiled = dispatch.compile_only(fn, args, constexprs, config)
        ptx = compiled.asm["ptx"]
        assert not re.search(r"^\s*(atom|red)\.", ptx, re.M), f"{fn.__name__}: atomics in the PTX"
        regs, spills = dispatch.register_spills(compiled)
        assert spills == 0, f"{fn.__name__}: {spills} spill bytes ({regs} registers)"
    # the real sizes are multiples of 16: the runtime marks them divisible, and so does compile_only
    signature, constexprs, attrs = dispatch.runtime_specialization(fn, args)
    assert attrs[(fn.__code__.co_varnames.index("C"),)] == [["tt.divisibility", 16]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [(128, 27, 27, 768), (128, 64, 64, 768), (64, 37, 37, 1024), (64, 64, 64, 1024)], ids=str
)
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str
)
def test_every_real_shape_compiles_without_spills(sm90_compile, shape, dtypes):
    for fn, args, constexprs, config in loss_kernel_builds(shape, *dtypes):
        regs, spills = dispatch.register_spills(dispatch.compile_only(fn, args, constexprs, config))
        assert spills == 0, f"{fn.__name__} {shape}: {spills} spill bytes ({regs} registers)"


# ---- GPU tier: the paper's target shapes, compiled kernels (no interpreter)


def triton_library_compilable() -> bool:
    """False without triton, or when it was imported under TRITON_INTERPRET=1 (its library is interpreted)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(dispatch.SUM_COMBINE, JITFunction)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_library_compilable(),
    reason="needs CUDA, and triton imported without TRITON_INTERPRET",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(128, 27, 27, 768), (128, 64, 64, 768)], ids=["dinov2_b", "sam_b"])
def test_gpu_target_shapes(monkeypatch, shape, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SAK_KERNELS", raising=False)  # CUDA default: Triton
    monkeypatch.setattr(dispatch, "poison_outputs", True)
    monkeypatch.setattr(dispatch, "strict", True)  # a failing kernel fails the test, no quiet fallback
    student, target = make_pair(shape, dtype, device="cuda")
    assert dispatch.kernel_backend(student) == "triton"
    check_against_float64(student, target, dtype)
