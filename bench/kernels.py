"""Benchmark the fused adapter and distillation loss: Triton vs eager torch vs torch.compile.

    python bench/kernels.py                       # GPU: ViT-B/L adapters over 128 x 577 tokens, loss at B=128
    python bench/kernels.py --small               # CPU smoke run: tiny shapes, Triton through the interpreter
    python bench/kernels.py --json out.json       # also write rows (after every row), peaks, config, version

Two input modes (`--modes`):
  autocast  the training case. Adapter: fp32 activations and parameters under torch.autocast(--dtype).
            Loss: the trainer's own call, `student.train.losses.distill_term` under autocast, on what the
            model hands it: a channels-last fp32 (B, C, H, W) student map (a permuted view of (B, H, W, C)
            memory) and the cached target in float16 (the default codec); the providers are the trainer's
            two paths (use_kernels=True: Triton; False: the torch reference) and torch.compile of the latter
  native    every input already in --dtype (contiguous), the kernels' own entry points
Cases run in value order (the goals' fwd+bwd rows under autocast first), one row at a time; with --json the
file is rewritten after every row, so a run stopped at its budget keeps what it measured.
The Triton provider is strict: a Triton failure is recorded as a failed case (exit 1), never timed as a
torch fallback. torch.compile gets a fresh `torch.compile(fn, dynamic=False)` per case after
`torch._dynamo.reset()`: one static graph per case (its compile time and graph count are in the row; a
recompile during timing fails the case).
Bandwidth and FLOP rates count the work every provider must do (adapter: read the inputs and grad_output
once, write the outputs and input grads once; loss: the forward reads student and target, the backward reads
them again and writes the student's gradient; matmul FLOPs), so the columns compare providers on equal
terms. Peaks are measured here: bandwidth by a large device copy, matmul throughput by a bf16 matmul.
Goals: adapter fwd+bwd >= 1.3x torch.compile under autocast; loss fwd+bwd >= 70% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

if not torch.cuda.is_available():  # before triton is imported: the CPU run goes through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from step_io import StepReport  # noqa: E402

from sak.kernels import dispatch  # noqa: E402
from sak.kernels.adapter import adapter_flops, adapter_reference, fused_adapter  # noqa: E402
from sak.kernels.distill_loss import distill_loss, distill_loss_reference  # noqa: E402
from sak.pipeline.base.provenance import code_version  # noqa: E402
from sak.student.train.losses import distill_term  # noqa: E402

PROVIDERS = ("triton", "eager", "compile")
MODES = ("autocast", "native")
PASSES = ("fwd+bwd", "fwd")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    small: bool = False  # tiny shapes that the CPU interpreter gets through in seconds
    dtype: str = "bfloat16"
    providers: tuple[str, ...] = PROVIDERS
    modes: tuple[str, ...] = MODES  # see the module docstring
    with_z: bool = False  # adapter input z added to x (u = x + z): every adapter of the model but the first
    compile_mode: str = "default"  # torch.compile mode of the "compile" provider
    warmup_ms: int = 25  # CUDA: do_bench warmup / repetition time
    rep_ms: int = 100
    cpu_reps: int = 3  # CPU: timed repetitions (median)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # adapter | distill_loss
    name: str  # a shape name of adapter_shapes / loss_shapes
    mode: str  # autocast | native
    provider: str
    pass_name: str  # fwd+bwd | fwd

    def __str__(self) -> str:
        return f"{self.op} {self.name} {self.mode} {self.provider} {self.pass_name}"


def adapter_shapes(small: bool) -> dict[str, tuple[tuple[int, int], int, int]]:
    """name -> (token shape, C, R): the ViT-B and ViT-L student adapters at 384 (577 tokens), batch 128."""
    tokens = (2, 37) if small else (128, 577)
    return {"vit_b": (tokens, 768, 192), "vit_l": (tokens, 1024, 256)}


def loss_shapes(small: bool) -> dict[str, tuple[int, ...]]:
    """name -> target (B, H, W, C): DINOv2-L 27x27 and SAM-L 64x64 grids (the train step's teachers), B=128."""
    if small:
        return {"dinov2_l": (2, 9, 9, 64), "sam_l": (2, 16, 16, 64)}
    return {"dinov2_l": (128, 27, 27, 1024), "sam_l": (128, 64, 64, 1024)}


def plan_cases(cfg: BenchConfig) -> list[Case]:
    """Every case in value order: the goal rows first (fwd+bwd under autocast: the adapter against
    torch.compile, the loss against the copy bandwidth), each compile row after the Triton and eager rows
    it is compared with; the native-dtype compile rows last (the slowest to get, the least needed)."""
    shapes = {"adapter": adapter_shapes(cfg.small), "distill_loss": loss_shapes(cfg.small)}
    fast = tuple(p for p in cfg.providers if p != "compile")
    slow = tuple(p for p in cfg.providers if p == "compile")
    cases: list[Case] = []

    def add(mode: str, pass_name: str, op: str, providers: tuple[str, ...]) -> None:
        cases.extend(Case(op, name, mode, p, pass_name) for name in shapes[op] for p in providers)

    modes = sorted(cfg.modes, key=MODES.index)
    for mode in modes:
        for pass_name in PASSES:
            add(mode, pass_name, "adapter", cfg.providers if mode == "autocast" else fast)
            add(mode, pass_name, "distill_loss", fast)
            if mode == "autocast":
                add(mode, pass_name, "distill_loss", slow)
    for mode in (m for m in modes if m != "autocast"):
        for pass_name in PASSES:
            add(mode, pass_name, "adapter", slow)
            add(mode, pass_name, "distill_loss", slow)
    return cases


# ---------------------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], object], cfg: BenchConfig, device: torch.device) -> float:
    """Median milliseconds per call: triton.testing.do_bench (CUDA events, L2 flushed) on GPU, wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median")
    fn()  # warmup: jit / compile
    times = []
    for _ in range(cfg.cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_peaks(device: torch.device, cfg: BenchConfig) -> dict[str, float]:
    """Peak bandwidth (GB/s) of a large copy and peak matmul TFLOP/s of a large bf16 matmul on `device`."""
    n_bytes = (64 << 20) if device.type == "cpu" else (2 << 30)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), cfg, device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, cfg, device)
    return {"bandwidth_gbs": 2 * n_bytes / copy_ms / 1e6, "matmul_tflops": 2 * n**3 / mm_ms / 1e9}


# ---------------------------------------------------------------------------------------------------------
# one case: inputs, the provider's callable, the timed passes


@dataclasses.dataclass
class Inputs:
    args: tuple
    kwargs: dict
    grad_inputs: list  # leaves the fwd+bwd pass differentiates
    grad_out: torch.Tensor | None
    autocast: tuple[str, torch.dtype] | None  # (device type, dtype) the forward runs under
    work: dict[str, tuple[int, int]]  # pass -> (bytes, flops) every provider must move / compute
    shape: str


def _rand(shape, gen, device, dtype, std=1.0) -> torch.Tensor:
    """Drawn on the device (no host tensors at the real sizes), then cast: a leaf that requires grad."""
    return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype).requires_grad_()


def adapter_inputs(
    cfg: BenchConfig, name: str, mode: str, device: torch.device, dtype: torch.dtype
) -> Inputs:
    tokens, C, R = adapter_shapes(cfg.small)[name]
    io = torch.float32 if mode == "autocast" else dtype
    gen = torch.Generator(device=device).manual_seed(0)
    x = _rand((*tokens, C), gen, device, io)
    z = _rand((*tokens, C), gen, device, io) if cfg.with_z else None
    params = [_rand((R, C), gen, device, io, C**-0.5), _rand((R,), gen, device, io, 0.1)]
    params += [_rand((C, R), gen, device, io, R**-0.5), _rand((C,), gen, device, io, 0.1)]
    scale = torch.ones(
        (1,) if mode == "autocast" else (), device=device, requires_grad=True
    )  # the model's (1,)
    grad_out = torch.randn(*tokens, C, generator=gen, device=device).to(io)  # out is in x's dtype
    M, es = tokens[0] * tokens[1], x.element_size()
    n_act = 3 if z is not None else 2  # x (+ z) read, out written
    weight_bytes = sum(p.numel() * es for p in params)
    work = {
        "fwd": (n_act * M * C * es + weight_bytes, adapter_flops(M, C, R)),
        # + grad_out read and grad x (+ z) written; weight grads written
        "fwd+bwd": ((2 * n_act) * M * C * es + 2 * weight_bytes, adapter_flops(M, C, R, backward=True)),
    }
    return Inputs(
        args=(x, *params, scale),
        kwargs={"z": z},
        grad_inputs=[x, *params, scale] + ([z] if z is not None else []),
        grad_out=grad_out,
        autocast=(device.type, dtype) if mode == "autocast" else None,
        work=work,
        shape=f"{M}x{C} r{R}{' +z' if z is not None else ''} {_mode_label(mode, dtype)}",
    )


def loss_inputs(cfg: BenchConfig, name: str, mode: str, device: torch.device, dtype: torch.dtype) -> Inputs:
    B, H, W, C = loss_shapes(cfg.small)[name]
    gen = torch.Generator(device=device).manual_seed(0)
    if mode == "autocast":  # what the trainer's distill_term gets from the model and the loader
        leaf = torch.randn(
            B, H, W, C, generator=gen, device=device
        ).requires_grad_()  # fp32 memory (B, H, W, C)
        student = leaf.permute(0, 3, 1, 2)  # (B, C, H, W) channels-last view, as SakStudent's maps are
        target = torch.randn(B, H, W, C, generator=gen, device=device).to(torch.float16)  # cached fp16
    else:
        leaf = torch.randn(B, H, W, C, generator=gen, device=device).to(dtype).requires_grad_()
        student = leaf
        target = torch.randn(B, H, W, C, generator=gen, device=device).to(dtype)
    es_s, es_t, numel = leaf.element_size(), target.element_size(), leaf.numel()
    # forward: read s and t; backward: read them again and write the gradient
    work = {"fwd": (numel * (es_s + es_t), 0), "fwd+bwd": (numel * (2 * es_s + 2 * es_t + es_s), 0)}
    label = "trainer fp32 channels-last + fp16 target" if mode == "autocast" else _mode_label(mode, dtype)
    return Inputs(
        args=(student, target),
        kwargs={},
        grad_inputs=[leaf],
        grad_out=None,
        autocast=(device.type, dtype) if mode == "autocast" else None,
        work=work,
        shape=f"{'x'.join(map(str, (B, H, W, C)))} {label}",
    )


def _mode_label(mode: str, dtype: torch.dtype) -> str:
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return f"fp32@autocast-{short}" if mode == "autocast" else short


def _with_backend(fn: Callable, backend: str) -> Callable:
    def run(*args, **kwargs):
        old = os.environ.get("SAK_KERNELS")
        os.environ["SAK_KERNELS"] = backend
        try:
            assert dispatch.kernel_backend(args[0]) == backend, f"the {backend} path is not selected"
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["SAK_KERNELS"]
            else:
                os.environ["SAK_KERNELS"] = old

    return run


def provider_fn(case: Case, cfg: BenchConfig) -> Callable:
    """The callable a provider times: the fused op (Triton forced), its torch reference, or a fresh
    static torch.compile of the reference."""
    if case.op == "adapter":
        fused, reference = fused_adapter, adapter_reference
    elif case.mode == "autocast":  # the trainer's own term: use_kernels selects the path, as in training
        fused, reference = partial(distill_term, use_kernels=True), partial(distill_term, use_kernels=False)
    else:
        fused, reference = distill_loss, distill_loss_reference
    if case.provider == "triton":
        return _with_backend(fused, "triton")
    if case.provider == "eager":
        return reference
    torch._dynamo.reset()  # no cache entry of an earlier case: one fresh static graph, no cache-limit fallback
    return torch.compile(reference, mode=cfg.compile_mode, dynamic=False)


def pass_fn(fn: Callable, inputs: Inputs, pass_name: str) -> Callable[[], object]:
    def context():
        if inputs.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(inputs.autocast[0], dtype=inputs.autocast[1])

    def fwd():
        with torch.no_grad(), context():
            return fn(*inputs.args, **inputs.kwargs)

    def fwd_bwd():
        with context():
            out = fn(*inputs.args, **inputs.kwargs)
        # autograd.grad, not .backward(): no accumulation into .grad, which would add a read-modify-write
        return torch.autograd.grad(out, inputs.grad_inputs, inputs.grad_out)

    return fwd if pass_name == "fwd" else fwd_bwd


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(case: Case, cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """One row. Raises when the case cannot be measured (a Triton failure in strict mode, a recompile)."""
    make = adapter_inputs if case.op == "adapter" else loss_inputs
    inputs = make(cfg, case.name, case.mode, device, dtype)
    call = pass_fn(provider_fn(case, cfg), inputs, case.pass_name)
    graphs0, t0 = _graphs(), time.perf_counter()
    call()  # first call: Triton jit + autotune, or the compile
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s, graphs = time.perf_counter() - t0, _graphs() - graphs0
    ms = time_ms(call, cfg, device)
    if case.provider == "compile" and _graphs() - graphs0 != graphs:
        raise RuntimeError(
            f"torch.compile recompiled while timing ({_graphs() - graphs0 - graphs} more graphs)"
        )
    n_bytes, flops = inputs.work[case.pass_name]
    row = {
        "op": case.op,
        "name": case.name,
        "mode": case.mode,
        "shape": f"{case.name} {inputs.shape}",
        "provider": case.provider,
        "pass": case.pass_name,
        "ms": ms,
        "bytes": n_bytes,
        "flops": flops,
        "gbs": n_bytes / ms / 1e6,
        "tflops": flops / ms / 1e9,
        "first_call_s": round(first_s, 3),  # compile (+ autotune) time
    }
    if case.provider == "compile":
        row["graphs"] = graphs  # 1: one static graph; more: graph breaks
    return row


def add_ratios(rows: list[dict], peaks: dict[str, float]) -> None:
    """Fraction of the measured peaks, and speedup of each row over eager / compile of the same case."""
    by_case = {(r["op"], r["shape"], r["pass"], r["provider"]): r["ms"] for r in rows}
    for r in rows:
        r["pct_bw"] = 100 * r["gbs"] / peaks["bandwidth_gbs"]
        r["pct_flops"] = 100 * r["tflops"] / peaks["matmul_tflops"]
        for base in ("eager", "compile"):
            base_ms = by_case.get((r["op"], r["shape"], r["pass"], base))
            r[f"x_{base}"] = base_ms / r["ms"] if base_ms else None


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<13}{'shape':<56}{'provider':<9}{'pass':<9}{'ms':>10}{'GB/s':>9}{'%bw':>6}"
    head += f"{'TFLOP/s':>9}{'%mm':>6}{'x eager':>9}{'x compile':>10}"
    lines = [head, "-" * len(head)]

    def ratio(v):
        return f"{v:.2f}" if v else "-"

    for r in rows:
        tflops = f"{r['tflops']:9.2f}{r['pct_flops']:6.1f}" if r["flops"] else f"{'-':>9}{'-':>6}"
        lines.append(
            f"{r['op']:<13}{r['shape']:<56}{r['provider']:<9}{r['pass']:<9}{r['ms']:10.3f}{r['gbs']:9.1f}"
            f"{r['pct_bw']:6.1f}{tflops}{ratio(r['x_eager']):>9}{ratio(r['x_compile']):>10}"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": getattr(dispatch.triton, "__version__", None),
        "python": sys.version.split()[0],
        "TRITON_INTERPRET": dispatch.interpreting(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "strict_triton": dispatch.strict,
    }


def preflight(cases: list[Case], cfg: BenchConfig) -> None:
    """What the GPU run needs before its first row, checked without one: the timing and compile modules
    import, and every case's provider callable can be built."""
    import torch._inductor.config  # noqa: F401  (the compile provider's backend)

    if dispatch.triton is not None:
        import triton.testing  # noqa: F401  (do_bench)
    for case in cases:
        provider_fn(case, cfg)
    torch._dynamo.reset()


def run(cfg: BenchConfig, report: StepReport) -> int:
    """Every case into `report`, one row at a time; the exit code (1 when a case failed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    cases = plan_cases(cfg)
    report.update(
        code_version=code_version(),
        config={
            **dataclasses.asdict(cfg),
            "adapter_shapes": adapter_shapes(cfg.small),
            "loss_shapes": loss_shapes(cfg.small),
            "cases": [str(c) for c in cases],
            "env_SAK_KERNELS": os.environ.get("SAK_KERNELS"),
        },
    )
    preflight(cases, cfg)
    if device.type == "cpu" and not cfg.small:
        return report.skip("no CUDA", "the real shapes need a GPU; --small runs tiny ones on the CPU")
    dispatch.strict = True  # a Triton failure is a failed case, never a torch row timed as Triton
    report.update(environment=environment(device))
    peaks = measure_peaks(device, cfg)
    report.update(peaks=peaks)
    for case in cases:
        try:
            row = measure(case, cfg, device, dtype)
        except Exception as e:  # recorded, and the other cases still run
            report.fail(str(case), e)
            print(f"FAILED {case}: {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
            continue
        report.rows.append(row)
        add_ratios(report.rows, peaks)
        report.flush()
        print(
            f"{case}: {row['ms']:.3f} ms ({row['gbs']:.0f} GB/s, first call {row['first_call_s']} s)",
            flush=True,
        )
    report.update(autotuned=dispatch.tuned_configs(), triton_fallbacks=dispatch.triton_failures())
    if dispatch.triton_failures():
        report.fail("Triton fell back to torch", str(dispatch.triton_failures()))
    print(f"peaks: copy {peaks['bandwidth_gbs']:.1f} GB/s, bf16 matmul {peaks['matmul_tflops']:.2f} TFLOP/s")
    print(format_table(report.rows))
    return report.done()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="tiny shapes (CPU smoke run via the interpreter)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma list of " + ", ".join(PROVIDERS)
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES) + " (see the docstring)"
    )
    parser.add_argument("--with-z", action="store_true", help="benchmark the adapter with z (u = x + z)")
    parser.add_argument(
        "--compile-mode", default="default", help="torch.compile mode of the compile provider"
    )
    parser.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warmup time per case")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench repetition time per case")
    parser.add_argument("--json", metavar="OUT", help="write rows (after every row), peaks, config, version")
    args = parser.parse_args(argv)
    providers = tuple(p for p in args.providers.split(",") if p)
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
    modes = tuple(m for m in args.modes.split(",") if m)
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; known: {', '.join(MODES)}")
    cfg = BenchConfig(
        small=args.small,
        dtype=args.dtype,
        providers=providers,
        modes=modes,
        with_z=args.with_z,
        compile_mode=args.compile_mode,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
    )
    return run(cfg, StepReport(args.json))


if __name__ == "__main__":
    sys.exit(main())
