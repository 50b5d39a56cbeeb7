"""Nothing lost, nothing trusted: crashes, concurrent runs, a full disk, corruption, hostile inputs.

Each test uses real processes and real files. The fault table in docs/faults.md lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import CacheLock
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.format.documents import read_cache
from sak.pipeline.inspection.verify import verify_cache
from sak.pipeline.sources.synthetic import make_photo

SIZE = 64


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(24):
        make_photo(100 + i, 96 + 8 * (i % 5), 80 + 8 * (i % 3)).save(root / f"p{i:03d}.png")
    return root


def _run_args(source: Path, out: Path) -> list[str]:
    return [
        "run",
        "--source",
        str(source),
        "--out",
        str(out),
        "--teachers",
        "dinov2_tiny,sam_tiny",
        "--size",
        str(SIZE),
        "--views-per-image",
        "2",
        "--shard-size",
        "2",
        "--batch-size",
        "1",
        "--no-progress",
    ]


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "sak.cli.cache", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def _journal_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob("teachers/*/shards.jsonl"))


def _wait_for_shards(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while _journal_lines(out) < n:
        assert proc.poll() is None, f"run ended before the fault could be injected:\n{proc.stdout.read()}"
        assert time.monotonic() - t0 < timeout, "no shard finished in time"
        time.sleep(0.05)


def _own_actor_pids(proc: subprocess.Popen, actor: str) -> list[int]:
    """Pids of `actor` processes that OUR driver started: descendants of the driver's pid (the embedded
    Ray it starts, raylet then workers, are its children and grandchildren, whatever sessions they
    open). Another run's actors on the same machine descend from another driver and are never matched."""
    parent, cmdline = {}, {}
    for entry in Path("/proc").iterdir():  # Linux: the test tiers run there
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmdline[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
                continue  # exited while we looked

    def descends(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen and pid > 1:
            if pid == proc.pid:
                return True
            seen.add(pid)
            pid = parent[pid]
        return False

    return sorted(pid for pid, cmd in cmdline.items() if actor in cmd and pid != proc.pid and descends(pid))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # clean up whatever the dead driver left (Ray daemons)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.mark.slow  # ~40 s: a real run killed mid-way, then re-run
def test_kill_driver_then_rerun_finishes_without_recomputing(many_photos, tmp_path, caplog):
    out = tmp_path / "cache"
    proc = _spawn(_run_args(many_photos, out))
    _wait_for_shards(proc, out, 4)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the driver, mid-run
    proc.wait(timeout=30)
    _kill_group(proc)
    done_before = {
        p.parent.name: len(p.read_text().splitlines()) for p in out.glob("teachers/*/shards.jsonl")
    }
    assert verify_cache(out)  # incomplete: verify says so
    with caplog.at_level("INFO", logger="sak"):
        assert cache_main(_run_args(many_photos, out)) == 0
    assert "skipping" in caplog.text and "already done" in caplog.text
    assert min(done_before.values()) >= 1
    assert verify_cache(out) == []  # every shard present once, checksums match, stores agree
    cache = read_cache(out)
    assert all(e.complete for e in cache.stores.values())


@pytest.mark.slow  # ~40 s
def test_kill_one_worker_actor_mid_run(many_photos, tmp_path):
    out = tmp_path / "cache"
    proc = _spawn(_run_args(many_photos, out))
    try:
        _wait_for_shards(proc, out, 2)
        pids = _own_actor_pids(proc, "TeacherWorker")
        assert pids, "no TeacherWorker process found in this run's process group"
        os.kill(pids[0], signal.SIGKILL)  # kill -9 of a worker actor of OUR run, mid-run
        output, _ = proc.communicate(timeout=240)
    finally:
        _kill_group(proc)
    # the actor is restarted and its shard retried (idempotent whole-shard writes); if the run had
    # stopped instead, re-running the same command would finish it:
    print(f"run after killing a worker: exit code {proc.returncode}")
    if proc.returncode != 0:
        assert "re-run the same command" in output, output
        assert cache_main(_run_args(many_photos, out)) == 0
    assert verify_cache(out) == []


def test_second_run_refuses_while_a_live_run_holds_the_lock(many_photos, tmp_path, capsys):
    out = tmp_path / "cache"
    out.mkdir()
    with CacheLock(out):  # a live holder (this process)
        assert cache_main(_run_args(many_photos, out)) == 2
        err = capsys.readouterr().err
        assert "being written by another sak-cache run" in err and f"pid {os.getpid()}" in err


def test_stale_lock_of_a_dead_process_is_taken_over(ray_local, photo_dir, tmp_path, caplog):
    out = tmp_path / "cache"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".sak-lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    cfg = ExtractConfig(
        views_per_image=2,
        source=str(photo_dir),
        out=str(out),
        teachers=("clip_tiny",),
        size=SIZE,
        progress=False,
    )
    with caplog.at_level("WARNING", logger="sak"):
        run_extraction(cfg)
    assert "stale lock" in caplog.text and str(dead.pid) in caplog.text
    assert verify_cache(out) == []
    assert (out / ".sak-lock").read_text() == ""  # released cleanly


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    print(f"run after killing a worker: exit code {proc.returncode}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); needs root")


def test_disk_full_gives_clear_error_and_rerun_completes(ray_local, photo_dir, tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, 4096)
    try:
        out = mnt / "cache"
        cfg = ExtractConfig(
            views_per_image=2,
            source=str(photo_dir),
            out=str(out),
            teachers=("sam_tiny",),
            size=SIZE,
            shard_size=2,
            batch_size=2,
            progress=False,
        )
        # ingest first (images and views fit), then fill the disk before the teacher shards are written
        run_extraction(dataclasses_replace(cfg, teachers=("clip_tiny",)))
        free = shutil.disk_usage(mnt).free
        ballast = mnt / "ballast"
        with open(ballast, "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))
        with pytest.raises(SakError, match="no space left on the device"):
            run_extraction(cfg)
        m = next(p for p in out.glob("teachers/sam_tiny-*/manifest.json"))
        recorded = json.loads(m.read_text())["shards"]
        for shard in recorded:  # whatever is recorded as done is complete and checks out
            for rel, _ in shard["files"].items():
                assert (m.parent / rel).is_file()
        ballast.unlink()  # space freed: the same command completes
        run_extraction(cfg)
        assert verify_cache(out) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.fixture(scope="module")
def small_cache(tiny_caches) -> Path:
    return tiny_caches.get()  # shared and read-only: each test damages its own copy


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_names_truncated_image_tar(small_cache, tmp_path):
    cache = _copy(small_cache, tmp_path / "c")
    tar = sorted((cache / "images").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    problems = verify_cache(cache)
    assert len(problems) == 1 and "image shard 0" in problems[0] and tar.name in problems[0]


def test_verify_names_deleted_chunk_shard_and_edited_manifest(small_cache, tmp_path):
    cache = _copy(small_cache, tmp_path / "c")
    store = next((cache / "teachers").iterdir())
    (store / "levels" / "3" / "c" / "1" / "0" / "0" / "0").unlink()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["levels"][0]["shape"][1] = 99
    (store / "manifest.json").write_text(json.dumps(manifest))
    problems = "\n".join(verify_cache(cache))
    assert "shard 1: file levels/3/c/1/0/0/0 is missing" in problems
    assert "manifest.json was modified" in problems
    assert "has shape" in problems


def test_schema_errors_name_the_field(small_cache, tmp_path, capsys):
    cache = _copy(small_cache, tmp_path / "c")
    data = json.loads((cache / "cache.json").read_text())
    data["num_views"] = "twelve"
    (cache / "cache.json").write_text(json.dumps(data))
    assert cache_main(["verify", str(cache)]) == 2
    assert "field 'num_views' should be int, found str" in capsys.readouterr().err
    data["num_views"], data["schema_version"] = 12, 99
    (cache / "cache.json").write_text(json.dumps(data))
    assert cache_main(["inspect", str(cache)]) == 2
    assert "field 'schema_version' is 99" in capsys.readouterr().err
    (cache / "cache.json").write_text("{not json")
    assert cache_main(["verify", str(cache)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_decompression_bomb_is_skipped_and_recorded(ray_local, photo_dir, tmp_path):
    import struct
    import zlib

    src = tmp_path / "src"
    shutil.copytree(photo_dir, src)
    # a 50000 x 50000 PNG: valid header, a few bytes of data; must be refused before any allocation
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    (src / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    out = tmp_path / "cache"
    run_extraction(
        ExtractConfig(
            views_per_image=2,
            source=str(src),
            out=str(out),
            teachers=("clip_tiny",),
            size=SIZE,
            progress=False,
        )
    )
    skipped = {s.key: s.reason for s in read_cache(out).dataset.skipped}
    assert "too many pixels: 50000x50000" in skipped["bomb"]
    assert verify_cache(out) == []


def test_nothing_in_the_code_unpickles_or_evals():
    root = Path(__file__).resolve().parents[1]
    for folder in ("pipeline", "student", "kernels", "cli"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "pickle.load" not in text and "allow_pickle=True" not in text, path
            for line in text.splitlines():
                if "torch.load(" in line:
                    assert "weights_only=True" in line, (path, line)
                assert " eval(" not in line and "=eval(" not in line, (path, line)


def test_a_shard_rewritten_after_a_kill_leaves_no_zarr_partial_file(tmp_path):
    """kill -9 during a Zarr shard write leaves zarr's `<file>.<uuid>.partial` beside the shard; the re-run
    rewrites that (unjournaled) shard whole and must take the leftover away, or verify reports it."""
    import torch

    from sak.pipeline.store.codecs import get_codec
    from sak.pipeline.store.zarr import ZarrTeacherStore, create_store

    create_store(tmp_path, 4, 2, {3: (2, 2, 8)}, get_codec("int8_tc"))
    store = ZarrTeacherStore(tmp_path, get_codec("int8_tc"), 2)
    rows = torch.randn(2, 2, 2, 8)
    files = store.write_shard(1, 2, {3: rows})
    leftovers = [tmp_path / f"{rel}.0123456789abcdef.partial" for rel in files]
    for p in leftovers:
        p.write_bytes(b"half a shard")
    assert store.write_shard(1, 2, {3: rows}) == files
    assert not any(p.exists() for p in leftovers)
