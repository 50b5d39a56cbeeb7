"""Backend selection and launch helpers shared by the fused ops in `adapter.py` and `distill_loss.py`.

Which implementation runs is decided per call by `kernel_backend(*tensors, dtype=...)`:

    SAK_KERNELS unset / "auto"  Triton when every tensor is on CUDA and the dtype is fp32/fp16/bf16,
                                the torch implementation otherwise (CPU tensors: torch, interpreter or not)
    SAK_KERNELS=torch           always the torch implementation
    SAK_KERNELS=triton          always Triton; CPU tensors then need TRITON_INTERPRET=1 (the interpreter)

The choice is made inside the custom ops at run time, so a `torch.compile`d graph follows the variable too.
Also here: `launch` (jit + autotune on GPU, one config under the interpreter), `dot_dtype`/`dot_precision`
(tl.dot operand dtype and fp32 precision policy), `new_buffer` (NaN-poisoned outputs in tests) and
`compile_only` (build a kernel for sm_90 on a machine without a GPU).

Kernels are written as plain functions and jitted lazily by `launch()`: `triton.jit` decides at decoration time
whether a kernel is compiled for the GPU or run by the CPU interpreter (TRITON_INTERPRET), and a test that
sets the variable after something else imported `sak.kernels` must still get interpreted kernels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; the torch implementations need none of it
    triton = None
    tl = None

# Kernels sum with `tl.reduce(x, axis, SUM_COMBINE)` and build zeros with `tl.full`, not `tl.sum`/`tl.zeros`:
# those two are @triton.jit functions of triton's own library, jitted once when triton is imported, so they
# only work under the interpreter if TRITON_INTERPRET was set before that import. Everything else used is a
# builtin, and the interpreter recognises this combine function and sums with numpy.
SUM_COMBINE = tl.standard._sum_combine if tl is not None else None

BACKENDS = ("torch", "triton")

# Tests set this to True: every buffer a kernel is meant to fill starts as NaN (integers as -1), so an
# element the kernel forgot to write fails the comparison instead of passing by luck.
poison_outputs = False

# Tests set this to True: a Triton failure raises instead of falling back to torch (see `triton_or_torch`).
strict = False


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_backend(*tensors: torch.Tensor | None, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'torch' for an op over `tensors` (None entries ignored) with inputs of `dtype`.

    See the module docstring; dtypes the kernels do not take (float64, ...) always run on torch unless
    SAK_KERNELS=triton forces them, which is an error.
    """
    forced = os.environ.get("SAK_KERNELS", "auto").strip().lower() or "auto"
    if forced not in (*BACKENDS, "auto"):
        raise ValueError(f"SAK_KERNELS={forced!r}: expected one of torch, triton, auto")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    supported = dtype is None or dtype in TRITON_DTYPES
    if forced == "torch" or (forced == "auto" and (not on_cuda or not supported or triton is None)):
        return "torch"
    if triton is None:
        raise RuntimeError("SAK_KERNELS=triton but triton is not installed")
    if not supported:
        raise ValueError(f"SAK_KERNELS=triton: the kernels take {TRITON_DTYPES}, not {dtype}")
    if not on_cuda and not interpreting():
        raise RuntimeError("SAK_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before launch)")
    return "triton"


_KERNELS: dict[tuple, Any] = {}


def _kernel(fn: Callable, configs: Sequence[Any] | None, key: Sequence[str]) -> Any:
    """`triton.jit(fn)` for the current interpret mode (autotuned over `configs` when given), cached."""
    tuning = None if configs is None else tuple(str(c) for c in configs)
    cache_key = (fn, interpreting(), tuning, tuple(key))
    if cache_key not in _KERNELS:
        kernel = triton.jit(fn)  # reads TRITON_INTERPRET now
        if configs is not None:
            kernel = triton.autotune(configs=list(configs), key=list(key))(kernel)
        _KERNELS[cache_key] = kernel
    return _KERNELS[cache_key]


def launch(
    fn: Callable,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    *args: Any,
    configs: Sequence[Any],
    key: Sequence[str] = (),
    **constexprs: Any,
) -> dict[str, Any]:
    """Run kernel `fn` (a plain Python function, jitted here) over `grid(meta)`; returns the meta used.

    On GPU with several `configs` the kernel is autotuned (keyed on `key` and the tensor dtypes) and the
    returned meta is only `constexprs`. Under the interpreter, or with one config, `configs[0]` is used
    directly: autotuning more than one config fails without a GPU.
    """
    if interpreting() or len(configs) == 1:
        config = configs[0]
        meta = {**constexprs, **config.kwargs}
        tuning = {} if interpreting() else {"num_warps": config.num_warps, "num_stages": config.num_stages}
        _kernel(fn, None, ())[grid(meta)](*args, **meta, **tuning)
        return meta
    _kernel(fn, configs, key)[grid](*args, **constexprs)
    return dict(constexprs)


def tl_dtype(dtype: torch.dtype) -> Any:
    """The triton.language dtype of a torch floating dtype the kernels take."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_dtype(dtype: torch.dtype) -> Any:
    """Operand dtype of tl.dot: the input dtype on GPU, float32 under the interpreter (bf16 dot is broken there)."""
    if interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot for inputs of `dtype`.

    float32 inputs follow torch's own switch: TF32 only when `torch.backends.cuda.matmul.allow_tf32` is on
    (off by default), IEEE fp32 otherwise, so the Triton path is as exact as the torch matmul it replaces.
    16-bit operands ignore the flag; they get Triton's default ("tf32").
    """
    if interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


_FAILED: dict[Hashable, str] = {}  # launch key -> why its Triton launch failed (torch from then on)


def triton_or_torch(key: Hashable, run_triton: Callable[[], Any], run_torch: Callable[[], Any]) -> Any:
    """`run_triton()`, or `run_torch()` when it raises (a compile error, an unsupported shape, no resources).

    The first failure of a launch `key` (op, dtypes, shape) warns once, names the cause and is remembered:
    later calls with the same key go straight to torch instead of failing (and compiling) again. Kernels
    never wait on one another, so a launch either returns or raises: there is no hang to fall back from.
    With `strict` (tests) the error is raised instead.
    """
    if key not in _FAILED:
        try:
            return run_triton()
        except Exception as e:
            if strict:
                raise
            _FAILED[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(
                f"{key[0] if isinstance(key, tuple) else key}: the Triton kernel failed "
                f"({_FAILED[key]}); using the torch implementation for this shape from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    return run_torch()


def triton_failures() -> dict[str, str]:
    """Launch keys that fell back to torch and why (for run and benchmark records)."""
    return {str(k): why for k, why in _FAILED.items()}


def new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN/-1 filled when `poison_outputs` is set (tests)."""
    if not poison_outputs:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def assert_dot_dims(**dims: int) -> None:
    """GPU tl.dot needs every block dim >= 16; the interpreter accepts less, so check here."""
    small = {name: d for name, d in dims.items() if d < 16}
    assert not small, f"tl.dot block dims must be >= 16, got {small}"


def tuned_configs() -> dict[str, str]:
    """The config each autotuned kernel settled on (its latest key), for benchmark and run records."""
    out = {}
    for (fn, _interpret, tuning, _key), kernel in _KERNELS.items():
        best = getattr(kernel, "best_config", None) if tuning else None
        if best is not None:
            out[f"{fn.__name__}[{len(out)}]"] = str(best)
    return out


def runtime_specialization(fn: Callable, args: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) the Triton runtime would compile `fn` with for these argument values.

    As `JITFunction.run` does at launch: an int equal to 1 becomes a constant, ints and pointers divisible
    by 16 (16-byte aligned) get `tt.divisibility = 16`, floats and bools are not specialised, and parameters
    marked `do_not_specialize` keep their plain type. So pass the REAL values: a size that is a multiple of
    16 at the real shapes compiles to different (vectorised) code than an arbitrary one.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    jit_fn = triton.jit(fn)
    params = {p.name: p for p in jit_fn.params}
    signature, constexprs, attrs = {}, {}, {}
    for name, value in args.items():
        param = params[name]
        kind, spec = native_specialize_impl(
            CUDABackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = kind
        if isinstance(spec, str):
            attrs[(jit_fn.arg_names.index(name),)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_only(
    fn: Callable, args: dict[str, Any], constexprs: dict[str, Any], config: Any, arch: int = 90
) -> Any:
    """Compile kernel `fn` for an NVIDIA GPU of compute capability `arch` without needing one (PTX + cubin).

    `args` maps every non-constexpr parameter to the value a real launch passes (tensors: any tensor of the
    right dtype, 16-byte aligned like every torch allocation; ints: the real sizes and strides), so the
    kernel is specialised as the runtime would specialise it (`runtime_specialization`).
    Catches what the interpreter does not (e.g. non-constexpr globals, layout or shared-memory limits).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not interpreting(), "compile_only needs TRITON_INTERPRET unset"
    signature, specialized, attrs = runtime_specialization(fn, args)
    constexprs = {**specialized, **constexprs, **config.kwargs}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(triton.jit(fn), signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def register_spills(compiled: Any, arch: int = 90) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) of a `compile_only` result, from `ptxas -v`."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cmd = [ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = (
        int(n) for n in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    )
    return regs, stores + loads
