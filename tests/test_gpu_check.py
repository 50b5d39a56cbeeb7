"""The lent-GPU check without a GPU: its plan and budgets, its goal arithmetic, a step stopped at its budget
keeping its rows, a run killed mid-way leaving a valid results file, the package linked without an install,
the code version from the carried stamp, and the carried-wheel checks (closure, ray trimming)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "device"))
import carry  # noqa: E402
import gpu_check  # noqa: E402
import gpu_goals  # noqa: E402
import wheels  # noqa: E402


def test_plan_fits_one_device_command_with_the_goals_first():
    plan = gpu_check.steps()
    assert [s.name for s in plan] == ["kernels", "train", "gpu-tests", "extract"]  # by value
    # the device tool stops a command at 600 s; install, probe and the write-up need the rest
    assert sum(s.budget_s for s in plan) <= gpu_check.TOTAL_BUDGET_S <= 560
    train = " ".join(next(s for s in plan if s.name == "train").argv)
    assert "--kernels both" in train and "dinov2_l,clip_l,sam_l" in train and "--skip-without-cuda" in train
    kernels = " ".join(plan[0].argv)
    assert "--modes autocast,native" in kernels and "--with-z" in kernels


def kernel_row(op, name, provider, x_compile=None, pct_bw=0.0, mode="autocast", pass_name="fwd+bwd"):
    return {"op": op, "name": name, "mode": mode, "provider": provider, "pass": pass_name,
            "x_compile": x_compile, "pct_bw": pct_bw}  # fmt: skip


def test_goals_from_recorded_figures():
    kernels = {
        "rows": [
            kernel_row("adapter", "vit_b", "triton", x_compile=1.4),
            kernel_row("adapter", "vit_l", "triton", x_compile=1.1),  # the worst shape decides: 1.1
            kernel_row("adapter", "vit_b", "triton", x_compile=3.0, mode="native"),  # not the training case
            kernel_row("adapter", "vit_b", "triton", x_compile=0.5, pass_name="fwd"),  # not fwd+bwd
            kernel_row("distill_loss", "dinov2_l", "triton", pct_bw=81.0),
            kernel_row("distill_loss", "sam_l", "triton", pct_bw=75.0),
            kernel_row("distill_loss", "sam_l", "eager", pct_bw=20.0),
        ]
    }
    train = {
        "rows": [
            {"mode": "cache", "kernels": False, "step_ms": 104.0},
            {"mode": "student only", "kernels": False, "step_ms": 100.0},
            {"mode": "online", "kernels": False, "step_ms": 300.0},
            {"mode": "cache", "kernels": True, "step_ms": 50.0},  # kernels on: not the goals' rows
        ]
    }
    steps = [{"name": "kernels", "figures": kernels}, {"name": "train", "figures": train}]
    got = [(round(g.value, 3), g.verdict) for g in gpu_goals.goals(steps)]
    # 1.1 < 1.3; min(81, 75) >= 70; 100 * (104 / 100 - 1) = 4 <= 5; 300 / 104 = 2.885 >= 2.5
    assert got == [(1.1, "NOT met"), (75.0, "met"), (4.0, "met"), (2.885, "met")]
    # a shape without its compile row (the step was cut short) leaves goal 1 unmeasured, never met
    kernels["rows"] = [r for r in kernels["rows"] if r["name"] != "vit_l"] + [
        kernel_row("adapter", "vit_l", "eager")
    ]
    assert gpu_goals.goals(steps)[0].verdict == "not measured"
    missing = gpu_goals.goals([])
    assert all(g.value is None and g.verdict == "not measured" for g in missing)
    assert "not measured" in gpu_goals.markdown({"steps": [], "goals": [g.to_dict() for g in missing]})


ROW_WRITER = """
import signal, sys, time
from step_io import StepReport
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
report = StepReport(sys.argv[1], config={"n": 3})
for i in range(3):
    report.add({"row": i})
time.sleep(60)
"""


@pytest.mark.parametrize("term", ["obeys", "ignore-term"])
def test_a_step_over_its_budget_is_stopped_and_keeps_its_rows(tmp_path, monkeypatch, term):
    monkeypatch.setattr(gpu_check, "GRACE_S", 2)
    step = gpu_check.Step(
        "slow", (sys.executable, "-c", ROW_WRITER, "{json}", term), 6, "writes rows, sleeps"
    )
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", tmp_path / "carry", [step], tmp_path / "pkg")
    check.result["steps"] = [{"name": "slow", "what": step.what}]
    t0 = time.monotonic()
    check.run_step(step, check.result["steps"][0], budget=6)
    record = check.result["steps"][0]
    assert record["status"] == "timeout after 6 s (3 rows kept)"
    assert time.monotonic() - t0 < 6 + 2 + 6  # SIGKILL came after the grace when SIGTERM was ignored
    assert record["figures"]["rows"] == [{"row": 0}, {"row": 1}, {"row": 2}]
    on_disk = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert on_disk["steps"][0]["figures"]["rows"][-1] == {"row": 2}  # folded while the step still ran


def test_step_status_from_exit_and_figures():
    assert gpu_check.step_status("exit", 0, 9, {"status": "skipped: no CUDA"}, None) == "skipped: no CUDA"
    assert gpu_check.step_status("exit", 0, 9, {"status": "done", "rows": [1]}, None) == "ok"
    assert gpu_check.step_status("exit", 1, 9, {"status": "failed"}, None) == "failed (exit 1)"
    assert (
        gpu_check.step_status("signal", -15, 9, {"rows": [1, 2]}, 15) == "stopped by signal 15 (2 rows kept)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the steps measure instead of skipping")
def test_a_run_killed_mid_way_leaves_a_valid_results_file(tmp_path):
    """As the device tool does at its time limit: kill -9 the whole run (runner and step) in the middle."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "bench/gpu_check.py",
        "--out",
        str(out),
        "--no-install",
        "--only",
        "kernels,extract",
    ]
    cmd += ["--work", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    results, deadline = out / "gpu-check.json", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and json.loads(results.read_text())["steps"][0]["status"] != "running":
                if json.loads(results.read_text())["steps"][0]["status"] != "not run yet":
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
        proc.wait()
    got = json.loads(results.read_text())  # atomic writes: never half a file
    kernels, extract = got["steps"]
    assert kernels["status"] == "skipped: no CUDA" and kernels["figures"]["status"] == "skipped: no CUDA"
    cases = kernels["figures"]["config"]["cases"]  # the set-up ran: every case planned, in value order
    assert len(cases) == 48 and cases[:6] == [
        f"adapter {n} autocast {p} fwd+bwd"
        for n in ("vit_b", "vit_l")
        for p in ("triton", "eager", "compile")
    ]
    assert all(" native compile " in c for c in cases[-8:]) and not any(
        " native compile " in c for c in cases[:-8]
    )
    assert extract["status"] in ("running", "not run yet")
    assert got["code_version"] and got["carry_bytes"]["total"] > 0 and got["probe"]["machine"]["cpus"]
    assert [g["verdict"] for g in got["goals"]] == ["not measured"] * 4
    assert (out / "gpu-check.md").read_text().startswith("# GPU check")


def test_the_package_is_linked_without_an_install(tmp_path):
    pkg = gpu_check.link_package(tmp_path / "pkg")
    # -S: no site-packages, so no editable install of sak either; only the links can provide it
    code = "import sak.pipeline.base.provenance as p, sak.kernels, sak.cli; print(p.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(pkg)}, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(out).resolve() == ROOT / "pipeline" / "base" / "provenance.py"


def test_code_version_from_the_stamp_without_git(tmp_path):
    root, stash = tmp_path / "tree", tmp_path / "carry"
    (root / "pipeline").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "sak-cache"\nversion = "0.1.0"\n')
    (root / "pipeline" / "a.py").write_text("x = 1\n")
    files = ["pipeline/a.py", "pyproject.toml"]
    stash.mkdir()
    stamp = {"code_version": "0.1.0+gabc1234", "tree_digest": carry.tree_digest(root, files), "files": files}
    (stash / "stamp.json").write_text(json.dumps(stamp))
    assert carry.code_version(root, stash) == "0.1.0+gabc1234"  # the tree as stamped
    (root / "pipeline" / "a.py").write_text("x = 2\n")
    assert carry.code_version(root, stash).startswith("0.1.0+gabc1234+changed-")  # edited after the stamp
    (stash / "stamp.json").unlink()
    assert carry.code_version(root, stash) == "0.1.0+unstamped"
    # the package reports what the stamp said (lru_cache: a fresh interpreter)
    code = "from sak.pipeline.base.provenance import code_version; print(code_version())"
    env = {**os.environ, "SAK_CODE_VERSION": "0.1.0+gabc1234"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "0.1.0+gabc1234"


def test_tree_digest_covers_paths_and_contents(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    base = carry.tree_digest(tmp_path, ["a", "b"])
    want = hashlib.sha256()
    for name, text in (("a", "1"), ("b", "2")):  # the rule, by hand
        want.update(f"{name}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    assert base == want.hexdigest()
    assert carry.tree_digest(tmp_path, ["a", "c"]) != base  # a missing file counts


def make_wheel(path: Path, name: str, version: str, requires: list[str], files: dict[str, tuple[bytes, int]]):
    """A minimal wheel: METADATA with Requires-Dist, the files (content, unix mode), RECORD."""
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        records = []
        for member, (data, mode) in {**files, f"{dist}/METADATA": (meta.encode(), 0o644)}.items():
            info = zipfile.ZipInfo(member)
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, data)
            digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{member},sha256={digest},{len(data)}")
        z.writestr(f"{dist}/RECORD", "\n".join([*records, f"{dist}/RECORD,,"]) + "\n")
    return path


def test_closure_check_names_what_neither_the_carry_nor_the_image_has(tmp_path):
    w = make_wheel(tmp_path / "zarr-3.1.6-py3-none-any.whl", "zarr", "3.1.6",
                   ["numcodecs>=0.14", "numpy>=1.25", "donfig>=0.8", "fsspec; extra == 'remote'",
                    "colorama; sys_platform == 'win32'"], {})  # fmt: skip
    image = {"numpy": "2.5.2", "packaging": None}
    wheels.check_closure([w], {"zarr": "3.1.6", "numcodecs": "0.16.6", "donfig": "0.8.1"}, image)  # all met
    with pytest.raises(SystemExit, match="donfig>=0.8 \\(neither carried nor in the image\\)"):
        wheels.check_closure([w], {"zarr": "3.1.6", "numcodecs": "0.16.6"}, image)
    with pytest.raises(SystemExit, match="numcodecs>=0.14 \\(carried 0.13\\)"):
        wheels.check_closure([w], {"zarr": "3.1.6", "numcodecs": "0.13", "donfig": "0.8.1"}, image)
    with pytest.raises(SystemExit, match="numpy>=1.25 \\(the image has 1.24\\)"):
        wheels.check_closure(
            [w], {"zarr": "3.1.6", "numcodecs": "0.16.6", "donfig": "0.8.1"}, {"numpy": "1.24"}
        )
    with pytest.raises(SystemExit, match="the image already has \\['packaging'\\]"):
        wheels.check_closure([w], {"zarr": "3.1.6", "packaging": "26.0"}, image)


def test_trimmed_wheel_drops_the_parts_keeps_modes_and_matches_its_record(tmp_path):
    files = {
        "ray/__init__.py": (b"# ray\n", 0o644),
        "ray/core/src/ray/raylet/raylet": (b"\x7fELF...", 0o755),
        "ray/jars/ray_dist.jar": (b"java" * 100, 0o644),
        "ray/serve/api.py": (b"serve = 1\n", 0o644),
        "ray/dashboard/client/build/main.js": (b"js", 0o644),
        "ray/dashboard/agent.py": (b"agent = 1\n", 0o644),
    }
    src = make_wheel(tmp_path / "ray-2.60.0-cp312-cp312-linux_x86_64.whl", "ray", "2.60.0", [], files)
    dst = tmp_path / "trimmed.whl"
    assert wheels.trim_wheel(src, dst, wheels.RAY_DROP) == 3
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert names == {"ray/__init__.py", "ray/core/src/ray/raylet/raylet", "ray/dashboard/agent.py",
                         "ray-2.60.0.dist-info/METADATA", "ray-2.60.0.dist-info/RECORD"}  # fmt: skip
        assert (z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16) & 0o777 == 0o755
        record = z.read("ray-2.60.0.dist-info/RECORD").decode().split()
        for line in record:
            member, digest, size = line.split(",")
            if member.endswith("RECORD"):
                continue
            data = z.read(member)
            assert (
                digest == "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            )
            assert int(size) == len(data)
        assert {line.split(",")[0] for line in record} == names


def test_carried_names_are_missing_from_the_image_and_pinned():
    carried, image = (
        wheels.read_pins(ROOT / "bench/device/carry.txt"),
        wheels.read_pins(ROOT / "bench/device/image.txt"),
    )
    assert {"ray", "zarr", "numcodecs", "jsonschema", "webdataset"} <= set(carried)
    assert not set(carried) & set(image) and all(carried.values())
    assert image["torch"] == "2.11.0" and image["triton"] == "3.6.0" and len(image) > 150
    sim = wheels.read_pins(ROOT / "bench/device/sim.txt")
    assert set(sim) <= set(image) and all(sim.values())  # the rehearsal holds image packages only, pinned
    assert all(sim[n] == v for n, v in image.items() if v and n in sim)


def test_keep_names_the_copy_after_the_device_and_the_start(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "BENCH", tmp_path)
    (tmp_path / "results").mkdir()
    result = {"started": "2026-12-02T14:40:32Z", "steps": [], "goals": [],
              "probe": {"python": {"torch": {"device": "NVIDIA H200"}}}}  # fmt: skip
    (tmp_path / "gpu-check.json").write_text(json.dumps(result))
    kept = gpu_check.keep(tmp_path)
    assert kept == tmp_path / "results" / "NVIDIA-H200-2026-12-02T14-40-32Z.json"
    assert json.loads(kept.read_text()) == result
    assert kept.with_suffix(".md").read_text().startswith("# GPU check: NVIDIA H200, 2026-12-02T14:40:32Z")


@pytest.mark.slow
def test_rehearsal_every_step_reaches_its_cuda_check(tmp_path):
    """`make gpu-rehearsal`: the device entry point in the simulated device environment (built once into
    .gpu-sim/ from PyPI when missing: minutes and ~5 GB) gets every step through its set-up."""
    out = tmp_path / "out"
    proc = subprocess.run(["make", "gpu-rehearsal", f"OUT={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((out / "gpu-check.json").read_text())
    assert [s["name"] for s in got["steps"]] == ["kernels", "train", "gpu-tests", "extract"]
    assert all(s["status"] == "skipped: no CUDA" for s in got["steps"]), [s["status"] for s in got["steps"]]
    assert got["install"]["status"] == "ok" and len(got["install"]["wheels"]) == 11
    python = got["probe"]["python"]
    assert python["python"].startswith("3.12") and python["torch"]["version"].startswith("2.11.0")
    assert python["triton"] == "3.6.0" and python["torch"]["cuda_available"] is False
    assert python["packages"]["ray"] == "2.60.0" and python["packages"]["zarr"] == "3.1.6"  # the carried ones
    assert got["carry_bytes"]["total"] < got["carry_bytes"]["limit"] == 64 << 20
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_carry_bytes_without_git_count_the_stamped_files(tmp_path):
    (tmp_path / "a.py").write_text("x" * 100)
    (tmp_path / "carry").mkdir()
    (tmp_path / "carry" / "stamp.json").write_text(json.dumps({"files": ["a.py", "gone.py"]}))
    sizes = carry.carry_bytes(tmp_path, tmp_path / "carry")  # not a checkout: git fails, the stamp counts
    assert sizes["tree"] == 100 and sizes["carry"] == (tmp_path / "carry" / "stamp.json").stat().st_size
    assert sizes["total"] == sizes["tree"] + sizes["carry"] and sizes["limit"] == 64 << 20
