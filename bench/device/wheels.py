"""`make gpu-wheels`: the carried folder .gpu-carry/ for the lent GPU machine (which reaches no registry).

    python3 bench/device/wheels.py                  # download, check, trim ray, stamp, print the sizes
    python3 bench/device/wheels.py --check-sim SIM  # (rehearsal) SIM holds only the image's packages

What it makes:
  .gpu-carry/wheels/   cp312 manylinux wheels of exactly bench/device/carry.txt: what sak needs and the
                       device image (bench/device/image.txt) lacks. Refused: a carried name the image has (two
                       versions stop the install), a wheel requirement met neither by carry.txt nor the image.
                       ray is repacked without the parts a run never loads (RAY_DROP; the full wheel is 79 MB)
  .gpu-carry/stamp.json  code version and tree digest (bench/device/carry.py), wheel sizes
Then it prints tree + carried bytes against the device tool's 64 MiB and fails over it. The downloads are
kept in .gpu-download/ (git-ignored, not carried), so a second run only re-stamps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carry import CARRY, LIMIT_BYTES, ROOT, folder_bytes, write_stamp  # noqa: E402

HERE = Path(__file__).resolve().parent
DOWNLOADS = ROOT / ".gpu-download"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
# Parts of the ray wheel that `ray.init(address="local")`, actors, tasks and shutdown never open, here or in
# the processes Ray starts (raylet's dashboard agent and runtime-env agent, the minimal dashboard head, the
# log monitor, the autoscaler monitor, workers): measured on a tiny extraction with an audit hook logging
# every file any of those processes opened under ray/. The Java worker's jar is a third of the wheel.
RAY_DROP = (
    "ray/jars/",
    "ray/dashboard/client/",  # the web UI's JavaScript build (include_dashboard=False)
    "ray/rllib/",
    "ray/data/",
    "ray/serve/",
    "ray/tune/",
    "ray/train/",
    "ray/air/",
    "ray/llm/",
    "ray/workflow/",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str | None]:
    """{normalized name: version or None} of a list with one `name` or `name==version` a line."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version or None
    return pins


def download(pins: dict[str, str | None], dest: Path) -> list[Path]:
    """The cp312 wheel of each pin in `dest` (pip download, no dependencies: carry.txt names them all)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest)]
    subprocess.run([*cmd, *(f"{n}=={v}" for n, v in pins.items())], check=True)
    wheels = []
    for name, version in pins.items():
        found = [w for w in dest.glob("*.whl") if _wheel_name(w) == (name, version)]
        if len(found) != 1:
            raise SystemExit(f"gpu-wheels: expected one wheel of {name}=={version} in {dest}, found {found}")
        wheels.append(found[0])
    return wheels


def _wheel_name(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return normalize(name), version


def requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel that apply on CPython 3.12 / Linux x86_64 without extras."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if _applies(r)]


def _applies(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
    req = Requirement(requirement)
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    env.update(platform_system="Linux", platform_machine="x86_64", implementation_name="cpython", extra="")
    return req.marker is None or req.marker.evaluate(env)


def check_closure(wheels: list[Path], carried: dict[str, str | None], image: dict[str, str | None]) -> None:
    """Every requirement of every carried wheel is carried (at a version it accepts) or in the image."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    both = sorted(set(carried) & set(image))
    if both:
        raise SystemExit(f"gpu-wheels: the image already has {both}: carry one only for another version")
    unmet = []
    for wheel in wheels:
        for line in requirements(wheel):
            req = Requirement(line)
            name = normalize(req.name)
            if name in carried and not req.specifier.contains(carried[name], prereleases=True):
                unmet.append(f"{wheel.name}: {line} (carried {carried[name]})")
            elif name not in carried and name not in image:
                unmet.append(f"{wheel.name}: {line} (neither carried nor in the image)")
            elif name in image and image[name] and not req.specifier.contains(image[name], prereleases=True):
                unmet.append(f"{wheel.name}: {line} (the image has {image[name]})")
    if unmet:
        raise SystemExit("gpu-wheels: unmet requirements:\n  " + "\n  ".join(unmet))


def trim_wheel(src: Path, dst: Path, drop: tuple[str, ...]) -> int:
    """Copy wheel `src` to `dst` without the members under `drop`, RECORD rewritten to match; file modes
    (the executable bit of ray's gcs_server and raylet) kept. Returns the number of members dropped."""
    dropped = 0
    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout,
    ):
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        kept_records = []
        for info in zin.infolist():
            if info.filename.startswith(drop):
                dropped += 1
                continue
            if info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            kept_records.append(f"{info.filename},sha256={digest},{len(data)}")
        kept_records.append(f"{record_name},,")
        record = zin.getinfo(record_name)
        zout.writestr(record, "\n".join(kept_records) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    return dropped


def build(carry: Path) -> dict[str, int]:
    carried = read_pins(HERE / "carry.txt")
    image = read_pins(HERE / "image.txt")
    downloaded = download(carried, DOWNLOADS)
    check_closure(downloaded, carried, image)
    out = carry / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.whl"):
        if stale.name not in {w.name for w in downloaded}:
            stale.unlink()
    for wheel in downloaded:
        target = out / wheel.name
        if target.exists() and target.stat().st_mtime >= wheel.stat().st_mtime:
            continue  # made from this download already
        if _wheel_name(wheel)[0] == "ray":
            n = trim_wheel(wheel, target.with_suffix(".tmp"), RAY_DROP)
            target.with_suffix(".tmp").replace(target)
            print(f"gpu-wheels: {wheel.name}: {n} files under {', '.join(RAY_DROP)} left out")
        else:
            target.write_bytes(wheel.read_bytes())
    return {w.name: w.stat().st_size for w in sorted(out.glob("*.whl"))}


def check_sim(sim_python: str) -> None:
    """The rehearsal's environment holds image packages only, at the image's versions where known."""
    image = read_pins(HERE / "image.txt")
    code = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    found = json.loads(subprocess.run([sim_python, "-c", code], capture_output=True, check=True).stdout)
    wrong = []
    for name, version in sorted(found.items()):
        n = normalize(name)
        if n not in image:
            wrong.append(f"{name} {version} is not in the device image")
        elif image[n] and image[n] != version.split("+")[0]:
            wrong.append(f"{name} {version}: the image has {image[n]}")
    if wrong:
        raise SystemExit(
            "gpu-rehearsal: the simulated environment is not the image's:\n  " + "\n  ".join(wrong)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, default=CARRY, help="the carried folder [.gpu-carry]")
    parser.add_argument("--check-sim", metavar="PYTHON", help="only check this interpreter's packages")
    args = parser.parse_args(argv)
    if args.check_sim:
        check_sim(args.check_sim)
        return 0
    wheels = build(args.carry)
    stamp = write_stamp(args.carry, ROOT, wheels)
    carried = folder_bytes(args.carry)
    total = stamp["tree_bytes"] + carried
    for name, size in wheels.items():
        print(f"  {size / 2**20:7.2f} MiB  {name}")
    print(
        f"gpu-wheels: tree {stamp['tree_bytes'] / 2**20:.2f} MiB ({len(stamp['files'])} files) + carried "
        f"{carried / 2**20:.2f} MiB = {total / 2**20:.2f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB; "
        f"code {stamp['code_version']}"
    )
    if total > LIMIT_BYTES:
        raise SystemExit("gpu-wheels: over the device tool's 64 MiB: trim more or carry less")
    return 0


if __name__ == "__main__":
    sys.exit(main())
