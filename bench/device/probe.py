"""What machine a gpu-check ran on: GPU, driver, CUDA, torch/triton, Python, /dev/shm, disk, memory, and the
versions of every package sak needs or the image lists (so the rehearsal's pins can follow the real image).

    python3 bench/device/probe.py          # print the probe as JSON

`machine()` reads the host with the stdlib and nvidia-smi; `python_env()` runs in a child interpreter (the
one the steps use, with their PYTHONPATH) so that importing torch never holds a CUDA context in the runner.
Nothing here raises: what cannot be read is recorded as the error that stopped it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NVIDIA_SMI_FIELDS = (
    "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
    "power.limit,temperature.gpu,pstate,compute_mode,mig.mode.current"
)


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {type(e).__name__}: {e}"
    return (
        proc.stdout.strip()
        if proc.returncode == 0
        else f"error: exit {proc.returncode}: {proc.stderr[-300:]}"
    )


def _space(path: str) -> dict:
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return {"error": str(e)}
    return {"total_gib": round(usage.total / 2**30, 2), "free_gib": round(usage.free / 2**30, 2)}


def _meminfo() -> dict:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError as e:
        return {"error": str(e)}
    kib = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.split()[1:2]}
    return {k: round(kib[k] / 2**20, 2) for k in ("MemTotal", "MemAvailable", "SwapTotal") if k in kib}


def machine(root: Path) -> dict:
    """The host as the stdlib and nvidia-smi see it."""
    smi = _run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"])
    gpus = smi if smi.startswith("error") else [
        dict(zip(NVIDIA_SMI_FIELDS.split(","), (v.strip() for v in line.split(",")))) for line in smi.splitlines()
    ]  # fmt: skip
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _meminfo(),
        "dev_shm": _space("/dev/shm"),
        "disk_tree": _space(str(root)),
        "disk_tmp": _space("/tmp"),
        "nvidia_smi": gpus,
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:],
        "user": os.environ.get("USER") or str(os.getuid()),
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "SAK_KERNELS")},
    }


def package_names() -> list[str]:
    """Every name in image.txt and carry.txt, plus sak's direct needs the image may have under its own name."""
    names = set()
    for listing in ("image.txt", "carry.txt"):
        for line in (HERE / listing).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(line.split("==")[0])
    return sorted(names, key=str.lower)


_CHILD = r"""
import importlib.metadata as md, json, sys
names = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for n in names:
    try:
        out["packages"][n] = md.version(n)
    except md.PackageNotFoundError:
        pass
try:
    import torch
    out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["torch"].update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                            memory_gib=round(p.total_memory / 2**30, 2), devices=torch.cuda.device_count(),
                            cudnn=torch.backends.cudnn.version())
except Exception as e:
    out["torch"] = {"error": f"{type(e).__name__}: {e}"}
try:
    import triton
    out["triton"] = triton.__version__
except Exception as e:
    out["triton"] = f"error: {type(e).__name__}: {e}"
print(json.dumps(out))
"""


def python_env(python: str, env: dict[str, str] | None = None) -> dict:
    """torch/triton/CUDA as the steps' interpreter sees them, and every package version it has."""
    try:
        proc = subprocess.run(
            [python, "-c", _CHILD, json.dumps(package_names())],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-1000:]}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    root = HERE.parents[1]
    print(json.dumps({"machine": machine(root), "python": python_env(sys.executable)}, indent=2))
