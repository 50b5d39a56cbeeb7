"""A write that fails for a reason the user fixes (a full disk, a quota, permissions, a read-only file system,
a too-long name) is one line naming the path and the fix, from whichever writer it strikes, in the driver,
the trainer or a Ray actor; nothing partial stays (no temporary file, the previous file intact)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base.oserrors import WRITE_FIXES, WriteError, find_os_error, write_error
from sak.pipeline.base.provenance import write_json_atomic
from sak.pipeline.inspection.verify import verify_cache
from tests.runs import copy_inputs, metrics, stage1_args, train_steps

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _full(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name]


# ------------------------------------------------------------------------------------------ the mechanism


@pytest.mark.parametrize("code", sorted(WRITE_FIXES))
def test_each_errno_is_one_line_naming_the_path_and_a_fix(code):
    e = write_error(OSError(code, os.strerror(code), "/tmp/x.tmp"), "/data/cache/cache.json")
    what, fix = WRITE_FIXES[code]
    assert str(e) == f"cannot write /data/cache/cache.json: {what}; {fix}"
    assert "\n" not in str(e) and "re-run" not in str(e)
    assert write_error(OSError(errno.EIO, "I/O error")) is None  # not one the user fixes this way
    assert write_error(ValueError("x")) is None


def test_the_os_error_a_ray_task_raised_is_found(ray_local):
    @ray_local.remote
    def task():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/teachers/s/levels/3/c/0")

    with pytest.raises(Exception) as info:
        ray_local.get(task.remote())
    assert find_os_error(info.value).errno == errno.ENOSPC
    assert "cannot write /data/cache/teachers/s/levels/3/c/0: no space left" in str(write_error(info.value))
    from sak.pipeline.extraction.actors import shard_failure_error

    line = str(shard_failure_error(info.value, Path("/data/cache"), 3))
    assert "no space left on the device; free space or pass another --out" in line and "3 shard(s)" in line


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_atomic_json_disk_full_keeps_the_previous_file_and_no_temp(where, tmp_path, monkeypatch):
    path = tmp_path / "doc.json"
    write_json_atomic(path, {"v": 1})
    monkeypatch.setattr(os, where, _full)
    with pytest.raises(WriteError, match=f"cannot write {path}: no space left on the device"):
        write_json_atomic(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


@pytest.mark.skipif(ROOT, reason="root writes into a read-only folder")
def test_atomic_json_into_a_read_only_folder_is_permission_denied(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=f"cannot write {folder / 'doc.json'}: permission denied"):
            write_json_atomic(folder / "doc.json", {})
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------------------- sak-cache


def _run_args(source: Path, out: Path, teacher: str = "clip_tiny") -> list[str]:
    return ["run", "--source", str(source), "--out", str(out), "--teachers", teacher, "--size", "64",
            "--views-per-image", "1", "--shard-size", "4", "--no-progress"]  # fmt: skip


def test_run_disk_full_writing_cache_json_is_one_line_then_the_same_command_completes(
    ray_local, photo_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cache"
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "cache.json":
            _full()
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    assert cache_main(_run_args(photo_dir, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "sak-cache")
    assert line == (
        f"sak-cache: error: cannot write {out / 'cache.json'}: no space left on the device; "
        f"free space or pass another --out"
    )
    assert _temps(out) == [] and not (out / "cache.json").exists()
    monkeypatch.undo()
    assert cache_main(_run_args(photo_dir, out)) == 0
    assert verify_cache(out) == []


def _mount_tmpfs(path: Path, size_kb: int, *options: str) -> None:
    path.mkdir()
    opts = ",".join([f"size={size_kb}k", *options])
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); needs root")


def test_run_disk_full_writing_a_shard_in_an_actor_is_one_line(ray_local, photo_dir, tmp_path, capsys):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, 4096)
    try:
        out = mnt / "cache"
        assert cache_main(_run_args(photo_dir, out)) == 0  # images and views fit
        capsys.readouterr()
        with open(mnt / "ballast", "wb") as f:
            f.write(b"\0" * max(0, os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - 64 * 1024))
        assert cache_main(_run_args(photo_dir, out, "sam_tiny")) == 2
        line = _one_error_line(capsys.readouterr().err, "sak-cache")
        assert f"cannot write {out}" in line and "no space left on the device; free space" in line, line
        assert "re-run" not in line
        assert _temps(out) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_run_with_a_too_long_out_name(photo_dir, tmp_path, capsys):
    out = tmp_path / ("c" * 300)
    assert cache_main(_run_args(photo_dir, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "sak-cache")
    assert line.startswith(f"sak-cache: error: cannot write {out}")  # (the first stat of it, by the CLI)
    assert line.endswith(": file name too long; pass a shorter --out") and not os.path.exists(out)


def _show(cache: Path, out: Path) -> list[str]:
    return ["show", str(cache), "--view", "0", "--out", str(out)]


def test_show_to_a_read_only_folder_is_one_line(tiny_caches, tmp_path, capsys):
    cache = tiny_caches.get()
    if ROOT:  # root writes through permissions: a read-only file system instead
        folder = tmp_path / "ro"
        _mount_tmpfs(folder, 64, "ro")
        what = "read-only file system; pass an --out on a writable file system"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        what = "permission denied"
    try:
        assert cache_main(_show(cache, folder / "sheet.png")) == 2
        line = _one_error_line(capsys.readouterr().err, "sak-cache")
        assert line.startswith(f"sak-cache: error: cannot write {folder / 'sheet.png'}: {what}"), line
        assert list(folder.iterdir()) == []
    finally:
        if ROOT:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        else:
            folder.chmod(0o700)


def test_show_disk_full_keeps_the_previous_png_and_a_too_long_name_is_one_line(
    tiny_caches, tmp_path, monkeypatch, capsys
):
    cache, out = tiny_caches.get(), tmp_path / "sheet.png"
    assert cache_main(_show(cache, out)) == 0
    before = out.read_bytes()
    monkeypatch.setattr(os, "replace", _full)
    assert cache_main(_show(cache, tmp_path / "sheet.png")) == 2
    monkeypatch.undo()
    assert "no space left on the device" in _one_error_line(capsys.readouterr().err, "sak-cache")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]
    long = tmp_path / ("s" * 300 + ".png")
    assert cache_main(_show(cache, long)) == 2
    assert f"cannot write {long}: file name too long" in _one_error_line(capsys.readouterr().err, "sak-cache")


# --------------------------------------------------------------------------------------------- sak-train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return copy_inputs(tmp_path_factory.mktemp("write_errors"))[0]


def test_stage1_checkpoint_disk_full_keeps_the_previous_checkpoint(
    cache, tmp_path, monkeypatch, capsys, one_thread
):
    import sak.student.run.checkpoint as checkpoint

    run = tmp_path / "run"
    assert train_main([*stage1_args(cache, run), "--stop-after", "2"]) == 0
    saved = (run / "checkpoint" / "state.json").read_bytes()
    real = checkpoint.save_file

    def save_file(tensors, filename, *a, **k):  # the file is half written, then the disk is full
        real(tensors, filename, *a, **k)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        _full()

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    capsys.readouterr()
    assert train_main(["stage1", "--resume", str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err, "sak-train")
    assert f"cannot write {run / 'checkpoint'}: no space left on the device; free space" in line, line
    assert not (run / "checkpoint.tmp").exists()
    assert (run / "checkpoint" / "state.json").read_bytes() == saved
    monkeypatch.undo()
    assert train_main(["stage1", "--resume", str(run)]) == 0
    assert train_steps(run) == [1, 2, 3, 4]


def test_stage1_metrics_disk_full_leaves_no_torn_line_and_resume_works(
    cache, tmp_path, monkeypatch, capsys, one_thread
):
    run = tmp_path / "run"
    assert train_main([*stage1_args(cache, run), "--stop-after", "2"]) == 0
    before = (run / "metrics.jsonl").read_bytes()
    real = os.write

    def write(fd, data):  # half of the line lands, then the disk is full
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real(fd, bytes(data)[: len(data) // 2])
            _full()
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    capsys.readouterr()
    assert train_main(["stage1", "--resume", str(run)]) == 2
    monkeypatch.undo()
    line = _one_error_line(capsys.readouterr().err, "sak-train")
    assert f"cannot write {run / 'metrics.jsonl'}: no space left on the device" in line, line
    assert (run / "metrics.jsonl").read_bytes() == before  # cut back: no torn line stays
    assert train_main(["stage1", "--resume", str(run)]) == 0
    assert train_steps(run) == [1, 2, 3, 4] and all(isinstance(r, dict) for r in metrics(run))
