"""Benchmark the fused adapter and distillation loss: Triton vs eager torch vs torch.compile.

    python bench/kernels.py                       # GPU: ViT-B/L adapters over 128 x 577 tokens, loss at B=128
    python bench/kernels.py --small               # CPU smoke run: tiny shapes, Triton through the interpreter
    python bench/kernels.py --json out.json       # also write rows, peaks, resolved config and code version

Two input modes, each a row group (`--modes`):
  autocast  the training case: fp32 activations and parameters under torch.autocast(--dtype); the loss gets
            a permuted (B, H, W, C) view of a channels-first fp32 student map and the target in --dtype
  native    every input already in --dtype (contiguous)
Bandwidth and FLOP rates count the work every provider must do (adapter: read the inputs and grad_output
once, write the outputs and input grads once; loss: the forward reads student and target, the backward reads
them again and writes the student's gradient, the fewest bytes of any loss that does not keep a whole image
on chip between the per-image sums and the gradient; matmul FLOPs), so the columns compare providers on
equal terms. Peaks are measured here: bandwidth by a large device copy, matmul throughput by a bf16 matmul.
Goals on H100: adapter fwd+bwd >= 1.3x torch.compile under autocast; loss fwd+bwd >= 70% of peak bandwidth.
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

import torch

if not torch.cuda.is_available():  # before triton is imported: the CPU run goes through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sak.kernels import dispatch  # noqa: E402
from sak.kernels.adapter import adapter_flops, adapter_reference, fused_adapter  # noqa: E402
from sak.kernels.distill_loss import distill_loss, distill_loss_reference  # noqa: E402
from sak.pipeline.base.provenance import code_version, write_json_atomic  # noqa: E402

PROVIDERS = ("triton", "eager", "compile")
MODES = ("autocast", "native")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    small: bool = False  # tiny shapes that the CPU interpreter gets through in seconds
    dtype: str = "bfloat16"
    providers: tuple[str, ...] = PROVIDERS
    modes: tuple[str, ...] = MODES  # autocast: fp32 inputs under autocast(dtype); native: inputs in dtype
    with_z: bool = False  # adapter input z added to x (u = x + z)
    compile_mode: str = "default"  # torch.compile mode of the "compile" provider
    warmup_ms: int = 25  # CUDA: do_bench warmup / repetition time
    rep_ms: int = 100
    cpu_reps: int = 3  # CPU: timed repetitions (median)


def adapter_shapes(small: bool) -> list[tuple[str, tuple[int, int], int, int]]:
    """(name, token shape, C, R) of the ViT-B and ViT-L adapters."""
    tokens = (2, 37) if small else (128, 577)
    return [("vit_b", tokens, 768, 192), ("vit_l", tokens, 1024, 256)]


def loss_shapes(small: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, map shape) of the loss targets: DINOv2-B 27x27x768 and SAM-B 64x64x768 at B=128."""
    if small:
        return [("dinov2_b", (2, 9, 9, 768)), ("sam_b", (2, 16, 16, 768))]
    return [("dinov2_b", (128, 27, 27, 768)), ("sam_b", (128, 64, 64, 768))]


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
# benchmark cases: each yields (provider, pass, callable)


def _with_backend(fn: Callable, backend: str) -> Callable:
    def run(*args, **kwargs):
        old = os.environ.get("SAK_KERNELS")
        os.environ["SAK_KERNELS"] = backend
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ["SAK_KERNELS"]
            else:
                os.environ["SAK_KERNELS"] = old

    return run


def _provider_fn(provider: str, fused: Callable, reference: Callable, cfg: BenchConfig) -> Callable:
    if provider == "triton":
        return _with_backend(fused, "triton")
    if provider == "eager":
        return reference
    return torch.compile(reference, mode=cfg.compile_mode)


def _fwd_and_fwd_bwd(
    fn: Callable, args: tuple, kwargs: dict, grad_inputs: list, grad_out: torch.Tensor | None, autocast
):
    """autocast: None, or (device type, dtype) to run the forward under torch.autocast."""

    def context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(autocast[0], dtype=autocast[1])

    def fwd():
        with torch.no_grad(), context():
            return fn(*args, **kwargs)

    def fwd_bwd():
        with context():
            out = fn(*args, **kwargs)
        # autograd.grad, not .backward(): no accumulation into .grad, which would add a read-modify-write
        return torch.autograd.grad(out, grad_inputs, grad_out)

    return fwd, fwd_bwd


def _mode_dtypes(mode: str, dtype: torch.dtype, device: torch.device):
    """(input dtype, autocast spec or None) of a mode."""
    if mode == "autocast":
        return torch.float32, (device.type, dtype)
    return dtype, None


def bench_adapter(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, mode: str) -> list[dict]:
    rows = []
    autocast_dtype = dtype
    dtype, autocast = _mode_dtypes(mode, dtype, device)
    for name, tokens, C, R in adapter_shapes(cfg.small):
        M = tokens[0] * tokens[1]
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, std=1.0, gen=gen):
            return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype).requires_grad_()

        x = rand(*tokens, C)
        z = rand(*tokens, C) if cfg.with_z else None
        params = [rand(R, C, std=C**-0.5), rand(R, std=0.1), rand(C, R, std=R**-0.5), rand(C, std=0.1)]
        scale = torch.ones((1,) if autocast else (), device=device, requires_grad=True)  # the model's (1,)
        grad_out = torch.randn(*tokens, C, generator=gen, device=device).to(dtype)  # out is in x's dtype
        args = (x, *params, scale)
        grad_inputs = [x, *params, scale] + ([z] if z is not None else [])
        es = x.element_size()
        n_act = 3 if cfg.with_z else 2  # x (+ z) read, out written
        weight_bytes = sum(p.numel() * es for p in params)
        work = {
            "fwd": (n_act * M * C * es + weight_bytes, adapter_flops(M, C, R)),
            # + grad_out read and grad x (+ z) written; weight grads written
            "fwd+bwd": ((2 * n_act) * M * C * es + 2 * weight_bytes, adapter_flops(M, C, R, backward=True)),
        }
        for provider in cfg.providers:
            fn = _provider_fn(provider, fused_adapter, adapter_reference, cfg)
            fwd, fwd_bwd = _fwd_and_fwd_bwd(fn, args, {"z": z}, grad_inputs, grad_out, autocast)
            label = f"{name} {M}x{C} r{R} {_mode_label(mode, autocast_dtype)}"
            for pass_name, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                n_bytes, flops = work[pass_name]
                ms = time_ms(call, cfg, device)
                rows.append(_row("adapter", label, provider, pass_name, ms, n_bytes, flops))
    return rows


def _mode_label(mode: str, dtype: torch.dtype) -> str:
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return f"fp32@autocast-{short}" if mode == "autocast" else short


def bench_loss(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, mode: str) -> list[dict]:
    """autocast mode: the trainer's inputs, a permuted view of a channels-first fp32 student map and the
    target as the cache stores it (dtype); native: both contiguous in dtype."""
    rows = []
    for name, shape in loss_shapes(cfg.small):
        gen = torch.Generator(device=device).manual_seed(0)
        B, H, W, C = shape
        if mode == "autocast":
            leaf = torch.randn(B, C, H, W, generator=gen, device=device).requires_grad_()  # (B, C, H, W)
            student = leaf.permute(0, 2, 3, 1)  # (B, H, W, C) view, as student.losses hands it over
        else:
            leaf = torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_()
            student = leaf
        target = torch.randn(*shape, generator=gen, device=device).to(dtype)
        es_s, es_t, numel = student.element_size(), target.element_size(), student.numel()
        # forward: read s and t; backward: read them again and write the gradient
        work = {"fwd": (numel * (es_s + es_t), 0), "fwd+bwd": (numel * (2 * es_s + 2 * es_t + es_s), 0)}
        label = f"{name} {'x'.join(map(str, shape))} {_mode_label(mode, dtype)}"
        for provider in cfg.providers:
            fn = _provider_fn(provider, distill_loss, distill_loss_reference, cfg)
            fwd, fwd_bwd = _fwd_and_fwd_bwd(fn, (student, target), {}, [leaf], None, None)
            for pass_name, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                n_bytes, flops = work[pass_name]
                ms = time_ms(call, cfg, device)
                rows.append(_row("distill_loss", label, provider, pass_name, ms, n_bytes, flops))
    return rows


def _row(op, shape, provider, pass_name, ms, n_bytes, flops) -> dict:
    return {
        "op": op,
        "shape": shape,
        "provider": provider,
        "pass": pass_name,
        "ms": ms,
        "bytes": n_bytes,
        "flops": flops,
        "gbs": n_bytes / ms / 1e6,
        "tflops": flops / ms / 1e9,
    }


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
    head = f"{'op':<13}{'shape':<48}{'provider':<9}{'pass':<9}{'ms':>10}{'GB/s':>9}{'%bw':>6}"
    head += f"{'TFLOP/s':>9}{'%mm':>6}{'x eager':>9}{'x compile':>10}"
    lines = [head, "-" * len(head)]

    def ratio(v):
        return f"{v:.2f}" if v else "-"

    for r in rows:
        tflops = f"{r['tflops']:9.2f}{r['pct_flops']:6.1f}" if r["flops"] else f"{'-':>9}{'-':>6}"
        lines.append(
            f"{r['op']:<13}{r['shape']:<48}{r['provider']:<9}{r['pass']:<9}{r['ms']:10.3f}{r['gbs']:9.1f}"
            f"{r['pct_bw']:6.1f}{tflops}{ratio(r['x_eager']):>9}{ratio(r['x_compile']):>10}"
        )
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not cfg.small:
        raise SystemExit("no CUDA device: the full shapes need a GPU; use --small for a CPU smoke run")
    dtype = getattr(torch, cfg.dtype)
    peaks = measure_peaks(device, cfg)
    rows = []
    for mode in cfg.modes:
        rows += bench_adapter(cfg, device, dtype, mode) + bench_loss(cfg, device, dtype, mode)
    add_ratios(rows, peaks)
    return {
        "code_version": code_version(),
        "config": {
            **dataclasses.asdict(cfg),
            "adapter_shapes": adapter_shapes(cfg.small),
            "loss_shapes": loss_shapes(cfg.small),
            "env_SAK_KERNELS": os.environ.get("SAK_KERNELS"),
        },
        "environment": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "triton": getattr(dispatch.triton, "__version__", None),
            "python": sys.version.split()[0],
            "TRITON_INTERPRET": dispatch.interpreting(),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "autotuned": dispatch.tuned_configs(),
            "triton_fallbacks": dispatch.triton_failures(),
        },
        "peaks": peaks,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
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
    parser.add_argument("--json", metavar="OUT", help="write rows, peaks, config and code version here")
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
    result = run(cfg)
    env, peaks = result["environment"], result["peaks"]
    print(
        f"{env['device']}  torch {env['torch']}  triton {env['triton']}  interpret={env['TRITON_INTERPRET']}"
    )
    print(f"peaks: copy {peaks['bandwidth_gbs']:.1f} GB/s, bf16 matmul {peaks['matmul_tflops']:.2f} TFLOP/s")
    print(format_table(result["rows"]))
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
