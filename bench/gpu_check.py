"""Everything a lent H100/H200 should measure, in one run of under 8 minutes: `make gpu-check`.

    python bench/gpu_check.py                 # on a CUDA machine: run every step, write bench/results/
    python bench/gpu_check.py --plan          # print the steps and their time budgets, run nothing

Steps, each a subprocess under its own time budget (killed when it runs over; the check goes on):
  gpu-tests      pytest -m gpu on the kernel tests: real shapes against float64, the training case under
                 autocast, bit-for-bit repeats, the loss kernels under contention from another stream
  kernels        bench/kernels.py: adapter fwd+bwd under autocast (fp32 inputs) and in bf16, against eager
                 and torch.compile; loss fwd+bwd GB/s against the measured copy bandwidth
  train          bench/train.py: ViT-B student at 384 with random-init DINOv2-L, CLIP-L and SAM-L teachers;
                 from the cache vs --online vs the student alone, kernels on and off
  extract        bench/extract.py with the same teachers: the Ray pipeline against a bare teacher forward
Results: bench/results/<device>-<date>.json (every step's command, status, seconds, output tail and parsed
figures, the goals and whether each was met) and the same as a markdown table next to it. Commit both.
Without CUDA the plan is printed and the script exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOTAL_BUDGET_S = 470  # under 8 minutes with start-up and the write-up
L_TEACHERS = "dinov2_l,clip_l,sam_l"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # run from the repository root; {json} is replaced by the step's JSON path
    budget_s: int
    what: str


def steps(python: str = sys.executable) -> list[Step]:
    """The steps in run order; budgets sum to TOTAL_BUDGET_S minus a margin."""
    tests = ("tests/test_kernel_gpu.py", "tests/test_kernel_adapter.py", "tests/test_kernel_distill_loss.py")
    return [
        Step(
            "gpu-tests",
            (python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests),
            110,
            "kernel tests on the GPU: float64 at real shapes, autocast, repeats, contention",
        ),
        Step(
            "kernels",
            (python, "bench/kernels.py", "--modes", "autocast,native", "--rep-ms", "60", "--json", "{json}"),
            100,
            "adapter and loss: Triton vs eager vs torch.compile, fp32@autocast-bf16 and bf16",
        ),
        Step(
            "train",
            (
                python,
                "bench/train.py",
                "--student",
                "vit_b",
                "--device",
                "cuda",
                "--size",
                "384",
                "--extract-teachers",
                L_TEACHERS,
                "--images",
                "48",
                "--batch-size",
                "32",
                "--steps",
                "6",
                "--warmup",
                "2",
                "--num-workers",
                "8",
                "--kernels",
                "both",
                "--json",
                "{json}",
            ),
            170,
            "stage-1 step: cache vs --online vs student alone, kernels off and on (ViT-B, L teachers, 384)",
        ),  # fmt: skip
        Step(
            "extract",
            (
                python,
                "bench/extract.py",
                "--teachers",
                L_TEACHERS,
                "--random-init",
                "--size",
                "384",
                "--images",
                "64",
                "--batch-size",
                "32",
                "--shard-size",
                "32",
                "--json",
                "{json}",
            ),
            80,
            "extraction: Ray pipeline vs bare teacher forward (same L teachers, 384)",
        ),  # fmt: skip
    ]


def run_step(step: Step, json_path: Path, deadline: float) -> dict:
    """Run one step under min(its budget, what is left); never raises."""
    budget = max(5, min(step.budget_s, int(deadline - time.monotonic())))
    argv = [a.replace("{json}", str(json_path)) for a in step.argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    record = {"step": step.name, "what": step.what, "argv": argv, "budget_s": budget}
    try:  # own session: on a timeout the whole group goes (Ray workers, compile workers), not just the child
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    except OSError as e:
        proc, status, output = None, f"failed to start ({e})", ""
    if proc is not None:
        try:
            output, _ = proc.communicate(timeout=budget)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this step started, and only it
            output, _ = proc.communicate()
            status = f"timeout after {budget} s"
    record.update(status=status, seconds=round(time.monotonic() - start, 1), output_tail=output[-4000:])
    if json_path.exists():
        try:
            record["figures"] = json.loads(json_path.read_text())
        except ValueError as e:
            record["figures_error"] = str(e)
    if step.name == "gpu-tests":
        record["summary"] = _pytest_summary(output)
    return record


def _pytest_summary(output: str) -> str:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return lines[-1].strip("= ") if lines else ""


# ---------------------------------------------------------------------------------------------------------
# goals


def goals(records: dict[str, dict]) -> list[dict]:
    """The issue's four goals against the figures (None where a step gave none)."""
    out = []
    kernels = records.get("kernels", {}).get("figures", {})
    rows = kernels.get("rows", [])

    def find(op, provider, shape_part):
        return [
            r for r in rows if r["op"] == op and r["provider"] == provider and r["pass"] == "fwd+bwd"
            and shape_part in r["shape"]
        ]  # fmt: skip

    ratios = [r["x_compile"] for r in find("adapter", "triton", "autocast") if r.get("x_compile")]
    out.append(_goal("adapter fwd+bwd under autocast, x torch.compile", min(ratios) if ratios else None, 1.3))
    pct = [r["pct_bw"] for r in find("distill_loss", "triton", "autocast")]
    out.append(_goal("loss fwd+bwd, % of copy bandwidth", min(pct) if pct else None, 70.0))
    train = records.get("train", {}).get("figures", {}).get("rows", {})
    cache = next(
        (v["step_ms"] for k, v in train.items() if k.startswith("cache") and "kernels" not in k), None
    )
    alone = next(
        (v["step_ms"] for k, v in train.items() if k.startswith("student") and "kernels" not in k), None
    )
    online = next(
        (v["step_ms"] for k, v in train.items() if k.startswith("online") and "kernels" not in k), None
    )
    over = 100 * (cache / alone - 1) if cache and alone else None
    out.append(
        _goal("stage-1 step from the cache, % over the student alone", over, 5.0, lower_is_better=True)
    )
    out.append(
        _goal("from the cache, x faster than --online", online / cache if cache and online else None, 2.5)
    )
    return out


def _goal(name: str, value: float | None, target: float, lower_is_better: bool = False) -> dict:
    met = None if value is None else (value <= target if lower_is_better else value >= target)
    return {"goal": name, "value": value, "target": target, "lower_is_better": lower_is_better, "met": met}


def markdown(result: dict) -> str:
    lines = [
        f"# GPU check: {result['device']}, {result['date']}",
        "",
        f"code {result['code_version']}, torch {result['torch']}, {result['total_s']:.0f} s in all",
        "",
        "| step | status | seconds | what |",
        "|---|---|---|---|",
    ]
    for r in result["steps"]:
        status = r["status"] + (f" ({r['summary']})" if r.get("summary") else "")
        lines.append(f"| {r['step']} | {status} | {r['seconds']} | {r['what']} |")
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for g in result["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        sign = "<=" if g["lower_is_better"] else ">="
        met = {True: "yes", False: "NO", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {value} | {sign} {g['target']} | {met} |")
    kernels = next((r for r in result["steps"] if r["step"] == "kernels"), {}).get("figures", {})
    if kernels.get("rows"):
        lines += ["", "| op | shape | provider | pass | ms | GB/s | %bw | x eager | x compile |"]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in kernels["rows"]:
            xe = f"{r['x_eager']:.2f}" if r.get("x_eager") else "-"
            xc = f"{r['x_compile']:.2f}" if r.get("x_compile") else "-"
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['provider']} | {r['pass']} | {r['ms']:.3f} | "
                f"{r['gbs']:.0f} | {r['pct_bw']:.1f} | {xe} | {xc} |"
            )
    train = next((r for r in result["steps"] if r["step"] == "train"), {}).get("figures", {})
    if train.get("rows"):
        lines += ["", "| stage-1 mode | step ms | samples/s | data wait |", "|---|---|---|---|"]
        for mode, r in train["rows"].items():
            wait = "-" if r["data_wait"] is None else f"{100 * r['data_wait']:.0f}%"
            lines.append(f"| {mode} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | {wait} |")
    extract = next((r for r in result["steps"] if r["step"] == "extract"), {}).get("figures", {})
    if extract:
        lines += ["", "| extraction | views/s |", "|---|---|"]
        lines.append(f"| pipeline (steady state) | {extract.get('pipeline_views_per_s', 0):.2f} |")
        lines.append(f"| bare teacher forward | {extract.get('bare_views_per_s', 0):.2f} |")
        lines.append(f"| efficiency | {extract.get('efficiency', 0):.3f} |")
    return "\n".join(lines) + "\n"


def print_plan(plan: list[Step]) -> None:
    total = sum(s.budget_s for s in plan)
    print(f"gpu-check plan: {len(plan)} steps, {total} s of budgets (whole run capped at {TOTAL_BUDGET_S} s)")
    for s in plan:
        print(f"  {s.name:<10} {s.budget_s:>4} s  {s.what}")
        print(f"  {'':<10}         $ {' '.join(s.argv)}")
    print(f"results: {RESULTS.relative_to(ROOT)}/<device>-<date>.json and .md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the steps and budgets, run nothing")
    parser.add_argument("--only", default="", help="comma list of steps to run [default: all]")
    args = parser.parse_args(argv)
    plan = steps()
    if args.only:
        plan = [s for s in plan if s.name in args.only.split(",")]
    import torch

    if args.plan or not torch.cuda.is_available():
        if not args.plan:
            print("no CUDA device: nothing to measure here; on a GPU machine this would run:")
        print_plan(plan)
        return 0
    from sak.pipeline.base.provenance import code_version

    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    stem = RESULTS / f"{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}-{date}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + TOTAL_BUDGET_S
    print_plan(plan)
    records = {}
    for step in plan:
        print(f"[{time.monotonic() - start:5.0f} s] {step.name} ...", flush=True)
        records[step.name] = run_step(step, Path(f"{stem}.{step.name}.json"), deadline)
        Path(f"{stem}.{step.name}.json").unlink(missing_ok=True)  # folded into the one results file
        print(f"[{time.monotonic() - start:5.0f} s] {step.name}: {records[step.name]['status']}", flush=True)
    result = {
        "device": device,
        "date": date,
        "code_version": code_version(),
        "torch": torch.__version__,
        "total_s": time.monotonic() - start,
        "steps": list(records.values()),
        "goals": goals(records),
    }
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    Path(f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md: commit them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
