"""Everything a lent H100/H200 should measure, in one run of under 10 minutes of command time.

    bash bench/device/run.sh                       # on the device machine (the one entry point; docs/gpu.md)
    make gpu-rehearsal OUT=DIR                     # the same entry point here, in a simulated device env
    python bench/gpu_check.py --out DIR --no-install [--only kernels,train]   # in an environment that has sak
    python bench/gpu_check.py --plan               # the steps and their budgets

The run: link the package (a `sak/` folder of links to pipeline/ kernels/ student/ cli/, put on PYTHONPATH:
no install), install the carried wheels offline (pip --no-index --target), probe the machine, then the
steps in value order, each a subprocess in its own process group under its own budget (SIGTERM, then
SIGKILL after GRACE_S; the run goes on):
  kernels    bench/kernels.py: adapter fwd+bwd under bf16 autocast vs eager and torch.compile(dynamic=False),
             the loss in the trainer's layout and dtypes; strict (a Triton failure is a failed case)
  train      bench/train.py: ViT-B student at 384 with random-init DINOv2-L, CLIP-L and SAM-L teachers:
             cache vs student alone vs live teachers (built once), kernels off then on
  gpu-tests  the kernels' GPU tests (real shapes against float64, inputs made on the GPU) and their sm_90
             compile checks, one JSON row per test as it lands (bench/pytest_rows.py)
  extract    bench/extract.py with the same teachers: the Ray pipeline vs a bare teacher forward, MFU
Each step writes its figures after every row; the runner folds them into OUT/gpu-check.json (atomically,
after every row and step: a run cut short still returns what it measured) with the code version
(SAK_CODE_VERSION from the carried stamp), what travelled (carry_bytes), the probe, and the four goals with
their verdicts (bench/gpu_goals.py); OUT/gpu-check.md is the same as tables. Without CUDA every step does
its imports and set-up and records `skipped: no CUDA`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH / "device"))
import carry  # noqa: E402
import probe  # noqa: E402
from gpu_goals import goals, markdown  # noqa: E402

TOTAL_BUDGET_S = 540  # the device tool allows 600 s a command: install, probe and write-up fit in the rest
GRACE_S = 10  # SIGTERM -> SIGKILL
POLL_S = 1.0
PACKAGES = ("pipeline", "kernels", "student", "cli")  # sak.<name> <- <name>/ (pyproject's package-dir)
L_TEACHERS = "dinov2_l,clip_l,sam_l"
GPU_TESTS = (
    "tests/test_kernel_gpu.py",
    "tests/test_kernel_adapter.py::test_gpu_real_shapes",
    "tests/test_kernel_distill_loss.py::test_gpu_target_shapes",
    "tests/test_kernel_adapter.py::test_kernels_compile_for_h100",
    "tests/test_kernel_distill_loss.py::test_kernels_compile_for_h100",
)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # run from the repository root; {json} is replaced by the step's JSON path
    budget_s: int
    what: str


def steps(python: str = sys.executable) -> list[Step]:
    """The steps in run order (by value: the goals' steps first); budgets sum to under TOTAL_BUDGET_S."""
    kernels = "bench/kernels.py --modes autocast,native --with-z --warmup-ms 20 --rep-ms 60"
    train = f"bench/train.py --student vit_b --device cuda --size 384 --extract-teachers {L_TEACHERS}"
    train += " --images 48 --batch-size 32 --steps 12 --num-workers 8 --kernels both --skip-without-cuda"
    tests = f"-m pytest -q -ra -p no:cacheprovider -p pytest_rows -o addopts= {' '.join(GPU_TESTS)}"
    extract = f"bench/extract.py --teachers {L_TEACHERS} --random-init --size 384 --images 64"
    extract += " --batch-size 32 --shard-size 32 --skip-without-cuda"
    what = {
        "kernels": "adapter and loss: Triton vs eager vs torch.compile, the training case first",
        "train": "stage-1 step: cache vs student alone vs live teachers (ViT-B, L teachers, 384)",
        "gpu-tests": "kernel tests on the GPU: float64 at real shapes, autocast, repeats, contention",
        "extract": "extraction: Ray pipeline vs bare teacher forward, views/s and MFU",
    }
    return [
        Step("kernels", (python, *kernels.split(), "--json", "{json}"), 170, what["kernels"]),
        Step("train", (python, *train.split(), "--json", "{json}"), 180, what["train"]),
        Step("gpu-tests", (python, *tests.split()), 70, what["gpu-tests"]),
        Step("extract", (python, *extract.split(), "--json", "{json}"), 80, what["extract"]),
    ]


def link_package(pkg: Path) -> Path:
    """pkg/sak/<name> -> ROOT/<name> for the mapped folders: `import sak.pipeline` without an install."""
    sak = pkg / "sak"
    sak.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = sak / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / name, target_is_directory=True)
    return pkg


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Check:
    """One gpu-check run: the results file, the steps' environment, and the signals that stop it."""

    def __init__(self, out: Path, work: Path, carry_dir: Path, plan: list[Step], pkg: Path) -> None:
        """pkg: the folder holding the linked `sak/` (link_package), importable in this process already."""
        from sak.pipeline.base.provenance import write_json_atomic

        self.out, self.work, self.carry, self.plan, self.pkg = out, work, carry_dir, plan, pkg
        for folder in (out, work):
            folder.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.stopped: int | None = None  # the signal that stopped the run
        self._write_json = write_json_atomic
        self.result: dict = {"kind": "sak-gpu-check", "schema_version": 1, "started": now()}
        self.env = self._step_env()

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT/SIGHUP stop the step in flight (its group: TERM, then KILL) and end the run with
        what it has; the results file is written on the way out."""

        def on_signal(signum, frame) -> None:
            self.stopped = signum

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    def _step_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        paths = [str(self.pkg), str(self.work / "site"), str(BENCH), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        # compiled Triton kernels and inductor graphs are shared between steps (gpu-tests reuses kernels')
        env.update(
            TRITON_CACHE_DIR=str(self.work / "triton"), TORCHINDUCTOR_CACHE_DIR=str(self.work / "inductor")
        )
        if "SAK_CODE_VERSION" not in env:
            if carry.read_stamp(self.carry) is not None:  # the device: no .git, the stamp says what this is
                env["SAK_CODE_VERSION"] = carry.code_version(ROOT, self.carry)
            else:
                from sak.pipeline.base.provenance import code_version

                env["SAK_CODE_VERSION"] = code_version()
        return env

    def write(self) -> None:
        self.result["total_s"] = round(time.monotonic() - self.start, 1)
        self.result["goals"] = [g.to_dict() for g in goals(self.result.get("steps", []))]
        self._write_json(self.out / "gpu-check.json", self.result)
        tmp = self.out / ".gpu-check.md.tmp"
        tmp.write_text(markdown(self.result))
        os.replace(tmp, self.out / "gpu-check.md")

    def left_s(self) -> float:
        return TOTAL_BUDGET_S - (time.monotonic() - self.start)

    def set_up(self, install: bool) -> None:
        self.result.update(
            code_version=self.env["SAK_CODE_VERSION"], carry_bytes=carry.carry_bytes(ROOT, self.carry)
        )
        self.result["probe"] = {"machine": probe.machine(ROOT)}
        self.result["steps"] = [
            {"name": s.name, "what": s.what, "status": "not run yet", "budget_s": s.budget_s}
            for s in self.plan
        ]
        self.write()
        if install:
            self.result["install"] = self.install()
            self.write()
        self.result["probe"]["python"] = probe.python_env(sys.executable, self.env)
        self.write()

    def install(self) -> dict:
        """The carried wheels into work/site, offline; recorded, never raised (the steps then say what broke)."""
        wheels = sorted(str(w) for w in (self.carry / "wheels").glob("*.whl"))
        if not wheels:
            return {"status": f"no wheels in {self.carry / 'wheels'}: run make gpu-wheels", "wheels": []}
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(self.work / "site"), *wheels]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = (proc.stdout + proc.stderr)[-2000:]
        except (OSError, subprocess.SubprocessError) as e:
            status, tail = f"failed ({type(e).__name__}: {e})", ""
        print(f"install: {status} ({len(wheels)} wheels, {time.monotonic() - t0:.0f} s)", flush=True)
        return {"status": status, "seconds": round(time.monotonic() - t0, 1), "wheels": [Path(w).name for w in wheels],
                "output_tail": tail}  # fmt: skip

    def run_all(self) -> None:
        for i, step in enumerate(self.plan):
            record = self.result["steps"][i]
            if self.stopped is not None:
                record["status"] = f"not run (stopped by signal {self.stopped})"
                continue
            budget = int(min(step.budget_s, self.left_s()))
            if budget < 10:
                record["status"] = "not run (the run's time is spent)"
                continue
            print(f"[{time.monotonic() - self.start:5.0f} s] {step.name} (budget {budget} s) ...", flush=True)
            self.run_step(step, record, budget)
            print(f"[{time.monotonic() - self.start:5.0f} s] {step.name}: {record['status']}", flush=True)
            self.write()
        self.write()

    def run_step(self, step: Step, record: dict, budget: int) -> None:
        """One step under `budget`: its JSON folded into `record` whenever it changes; never raises."""
        json_path, log_path = self.work / f"{step.name}.json", self.work / f"{step.name}.log"
        json_path.unlink(missing_ok=True)
        argv = [a.replace("{json}", str(json_path)) for a in step.argv]
        env = {**self.env, "SAK_STEP_JSON": str(json_path)}
        record.update(argv=argv, budget_s=budget, status="running")
        start, seen, end = time.monotonic(), None, None
        with open(log_path, "wb") as log, open(log_path, "rb") as echo:
            try:  # own session: at the budget the whole group goes (Ray, compile workers), not just the child
                proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
            except OSError as e:
                record.update(status=f"failed to start ({e})", seconds=0.0)
                return
            while end is None:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    end = "exit"
                except subprocess.TimeoutExpired:
                    rc = None
                sys.stdout.write(echo.read().decode(errors="replace"))
                sys.stdout.flush()
                seen = self._fold(json_path, record, seen)
                if end is None and time.monotonic() - start > budget:
                    end = "timeout"
                elif end is None and self.stopped is not None:
                    end = "signal"
            if end != "exit":
                rc = stop_group(proc)
            else:
                kill_group(proc.pid)  # whatever the step left behind in its group (a Ray worker, say)
            sys.stdout.write(echo.read().decode(errors="replace"))
        self._fold(json_path, record, None)
        record["seconds"] = round(time.monotonic() - start, 1)
        record["output_tail"] = log_path.read_bytes()[-4000:].decode(errors="replace")
        record["status"] = step_status(end, rc, budget, record.get("figures"), self.stopped)

    def _fold(self, json_path: Path, record: dict, seen: float | None) -> float | None:
        """Read the step's JSON into `record` and rewrite the results file, when it changed since `seen`."""
        try:
            mtime = json_path.stat().st_mtime_ns
        except FileNotFoundError:
            return seen
        if mtime == seen:
            return seen
        try:
            record["figures"] = json.loads(json_path.read_text())
        except ValueError as e:  # never half a file (atomic writes); a bad one is recorded, not fatal
            record["figures_error"] = str(e)
        self.write()
        return mtime


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group this runner started for a step (and only it)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen) -> int | None:
    """SIGTERM to the step's group, SIGKILL after GRACE_S; the step's exit code."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def step_status(end: str, rc: int | None, budget: int, figures: dict | None, stopped: int | None) -> str:
    rows = len((figures or {}).get("rows", []))
    if end == "timeout":
        return f"timeout after {budget} s ({rows} rows kept)"
    if end == "signal":
        return f"stopped by signal {stopped} ({rows} rows kept)"
    if rc != 0:
        return f"failed (exit {rc})"
    status = (figures or {}).get("status", "")
    return status if status.startswith("skipped") else "ok"


def keep(files_at: Path) -> Path:
    """Copy a device run's gpu-check.json (and its table) into bench/results/<device>-<date>.json/.md."""
    result = json.loads((files_at / "gpu-check.json").read_text())
    device = result.get("probe", {}).get("python", {}).get("torch", {}).get("device") or "no-cuda"
    stem = "-".join(part for part in (device, result.get("started", "")) if part)
    stem = "".join(c if c.isalnum() else "-" for c in stem).strip("-")
    target = BENCH / "results" / f"{stem}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    target.with_suffix(".md").write_text(markdown(result))
    return target


def print_plan(plan: list[Step]) -> None:
    total = sum(s.budget_s for s in plan)
    print(f"gpu-check plan: {len(plan)} steps, {total} s of budgets (whole run capped at {TOTAL_BUDGET_S} s)")
    for s in plan:
        print(f"  {s.name:<10} {s.budget_s:>4} s  {s.what}")
        print(f"  {'':<10}         $ {' '.join(s.argv)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder [$OUT]")
    parser.add_argument("--carry", type=Path, default=Path(os.environ.get("SAK_CARRY", carry.CARRY)))
    parser.add_argument("--work", type=Path, help="scratch folder [a new one under /tmp]")
    parser.add_argument("--only", default=os.environ.get("SAK_GPU_STEPS", ""), help="comma list of steps")
    parser.add_argument(
        "--no-install", action="store_true", help="use this environment's packages as they are"
    )
    parser.add_argument(
        "--expect-skipped", action="store_true", help="exit 1 unless every step was skipped for want of CUDA"
    )
    parser.add_argument("--plan", action="store_true", help="print the steps and budgets, run nothing")
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="copy DIR/gpu-check.json into bench/results/"
    )
    args = parser.parse_args(argv)
    if args.keep:
        print(f"kept {keep(args.keep)} and its .md: commit both")
        return 0
    plan = steps()
    if args.only:
        unknown = set(args.only.split(",")) - {s.name for s in plan}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in args.only.split(",")]
    if args.plan:
        print_plan(plan)
        return 0
    if args.out is None:
        parser.error("--out DIR (or OUT=DIR) is required")
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="sak-gpu-check-"))).resolve()
    pkg = link_package(work / "pkg")
    sys.path.insert(0, str(pkg))  # the linked package, for this process too (the device has no install)
    check = Check(args.out.resolve(), work, args.carry.resolve(), plan, pkg)
    check.catch_signals()
    print_plan(plan)
    check.set_up(install=not args.no_install)
    check.run_all()
    statuses = [s["status"] for s in check.result["steps"]]
    print(markdown(check.result))
    print(f"wrote {args.out / 'gpu-check.json'} and gpu-check.md")
    if check.stopped is not None:
        return 128 + check.stopped
    if args.expect_skipped:
        return 0 if all(s.startswith("skipped: no CUDA") for s in statuses) else 1
    return 0 if all(s == "ok" or s.startswith("skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
