"""The four goals of a gpu-check, read off its steps' figures, and the markdown table of a results file.

    goal                                                         from            target
    1 adapter fwd+bwd under bf16 autocast, x torch.compile       kernels rows    >= 1.3 (the worst shape)
    2 distillation loss fwd+bwd (trainer layout), % of copy bw   kernels rows    >= 70  (the worst shape)
    3 stage-1 step from the cache, % over the student alone      train rows      <= 5
    4 stage-1 step from the cache, x faster than live teachers   train rows      >= 2.5
A goal whose rows are missing (step skipped, failed or cut short) is 'not measured', never met.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Goal:
    goal: str
    value: float | None
    target: float
    lower_is_better: bool
    verdict: str  # met | NOT met | not measured
    basis: str  # which rows it was read from

    def to_dict(self) -> dict:
        return asdict(self)


def _verdict(value: float | None, target: float, lower_is_better: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= target if lower_is_better else value >= target) else "NOT met"


def _goal(name: str, value: float | None, target: float, basis: str, lower_is_better: bool = False) -> Goal:
    return Goal(name, value, target, lower_is_better, _verdict(value, target, lower_is_better), basis)


def _figures(steps: list[dict], name: str) -> dict:
    return next((s.get("figures") or {} for s in steps if s["name"] == name), {})


def kernel_goals(kernels: dict) -> list[Goal]:
    rows = [r for r in kernels.get("rows", []) if r.get("mode") == "autocast" and r.get("pass") == "fwd+bwd"]
    adapter = [r for r in rows if r["op"] == "adapter" and r["provider"] == "triton" and r.get("x_compile")]
    names = sorted({r["name"] for r in rows if r["op"] == "adapter"})
    # the worst shape decides, and only once every shape has its compile row
    full = len(adapter) == len(names) and adapter
    ratio = min(r["x_compile"] for r in adapter) if full else None
    loss = [r for r in rows if r["op"] == "distill_loss" and r["provider"] == "triton"]
    loss_names = sorted({r["name"] for r in rows if r["op"] == "distill_loss"})
    pct = min(r["pct_bw"] for r in loss) if loss and len(loss) == len(loss_names) else None
    return [
        _goal("adapter fwd+bwd under bf16 autocast, x torch.compile", ratio, 1.3, f"adapter {names}"),
        _goal("distillation loss fwd+bwd in the trainer's layout, % of copy bandwidth", pct, 70.0,
              f"distill_loss {loss_names}"),
    ]  # fmt: skip


def train_goals(train: dict) -> list[Goal]:
    rows = {(r["mode"], r["kernels"]): r for r in train.get("rows", []) if r.get("step_ms")}
    cache, alone, online = (
        rows.get((m, False), {}).get("step_ms") for m in ("cache", "student only", "online")
    )
    over = 100 * (cache / alone - 1) if cache and alone else None
    faster = online / cache if cache and online else None
    basis = "rows cache, student only, online (kernels off, the trainer's default)"
    return [
        _goal(
            "stage-1 step from the cache, % over the student alone", over, 5.0, basis, lower_is_better=True
        ),
        _goal("stage-1 step from the cache, x faster than live teachers", faster, 2.5, basis),
    ]


def goals(steps: list[dict]) -> list[Goal]:
    return kernel_goals(_figures(steps, "kernels")) + train_goals(_figures(steps, "train"))


def _num(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    probe = result.get("probe", {})
    torch_info = probe.get("python", {}).get("torch", {})
    lines = [
        f"# GPU check: {torch_info.get('device') or 'no CUDA device'}, {result.get('started', '?')}",
        "",
        f"code {result.get('code_version')}, torch {torch_info.get('version')}, triton "
        f"{probe.get('python', {}).get('triton')}, {_num(result.get('total_s'), '.0f')} s in all, "
        f"carried {_num(result.get('carry_bytes', {}).get('total', 0) / 2**20)} MiB",
        "",
        "| step | status | seconds | budget | what |",
        "|---|---|---|---|---|",
    ]
    for s in result.get("steps", []):
        lines.append(
            f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} | {s.get('budget_s', '-')} | {s['what']} |"
        )
    lines += ["", "| goal | value | target | verdict |", "|---|---|---|---|"]
    for g in result.get("goals", []):
        sign = "<=" if g["lower_is_better"] else ">="
        lines.append(f"| {g['goal']} | {_num(g['value'])} | {sign} {g['target']} | {g['verdict']} |")
    lines += _kernel_table(_figures(result.get("steps", []), "kernels"))
    lines += _train_table(_figures(result.get("steps", []), "train"))
    lines += _extract_table(_figures(result.get("steps", []), "extract"))
    return "\n".join(lines) + "\n"


def _kernel_table(kernels: dict) -> list[str]:
    if not kernels.get("rows"):
        return []
    out = ["", "| op | shape | provider | pass | ms | GB/s | %bw | x eager | x compile | first call s |"]
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in kernels["rows"]:
        out.append(
            f"| {r['op']} | {r['shape']} | {r['provider']} | {r['pass']} | {r['ms']:.3f} | {r['gbs']:.0f} | "
            f"{_num(r.get('pct_bw'), '.1f')} | {_num(r.get('x_eager'))} | {_num(r.get('x_compile'))} | "
            f"{r.get('first_call_s')} |"
        )
    return out


def _train_table(train: dict) -> list[str]:
    rows = [r for r in train.get("rows", []) if r.get("step_ms")]
    if not rows:
        return []
    out = ["", "| stage-1 mode | step ms | samples/s | data wait | timed steps |", "|---|---|---|---|---|"]
    for r in rows:
        wait = "-" if r.get("data_wait") is None else f"{100 * r['data_wait']:.0f}%"
        mode = r["mode"] + (" +kernels" if r["kernels"] else "")
        out.append(
            f"| {mode} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} | {wait} | {r['steps_timed']} |"
        )
    return out


def _extract_table(extract: dict) -> list[str]:
    rows = extract.get("rows", [])
    if not rows:
        return []
    out = ["", "| extraction | views/s | MFU (datasheet peak) | MFU (measured peak) |", "|---|---|---|---|"]
    for r in rows:
        mfu = [
            _num(None if r.get(k) is None else 100 * r[k], ".1f")
            for k in ("mfu_datasheet", "mfu_measured_peak")
        ]
        out.append(f"| {r['measure']} | {r['views_per_s']:.2f} | {mfu[0]}% | {mfu[1]}% |")
    if extract.get("efficiency") is not None:
        out.append(f"| efficiency (pipeline / bare) | {extract['efficiency']:.3f} | | |")
    return out
