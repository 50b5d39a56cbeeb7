"""Is a local --out usable: writable here, and (on a multi-node Ray cluster) one folder every node sees."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.base.oserrors import write_error
from sak.pipeline.format.layout import CACHE_FILE, VIEWS_FILE


def node_probe(folder: str, driver_probe: str, node: str) -> str | None:
    """On one node: can it see the driver's probe file, and write one the driver can read back?"""
    if not os.path.isfile(os.path.join(folder, driver_probe)):
        return "cannot see the driver's files"
    try:
        with open(os.path.join(folder, f".probe-{node}"), "w") as f:
            f.write(node)
    except OSError as e:
        return f"cannot write there ({e.strerror})"
    return None


def probe_nodes(out: Path) -> None:
    """A local --out on a Ray cluster must be one folder shared by every node: each alive node reads the
    driver's probe file and writes one back before any work; otherwise refuse, naming the node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    driver_probe = f".probe-driver-{os.getpid()}"
    (out / driver_probe).write_text("driver")
    task = ray.remote(num_cpus=0)(node_probe)
    try:
        refs = {
            n["NodeID"][:12]: (
                n["NodeManagerAddress"],
                task.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(str(out), driver_probe, n["NodeID"][:12]),
            )
            for n in nodes
        }
        for node, (address, ref) in refs.items():
            problem = ray.get(ref)
            if problem is None and not (out / f".probe-{node}").is_file():
                problem = "wrote a probe file the driver cannot see"
            if problem:
                raise SakError(
                    f"node {node} ({address}) {problem} under {out}: --out must be on storage every node "
                    f"shares; use shared storage (NFS, a mounted volume) or a bucket (--out s3://bucket/prefix)"
                )
    finally:
        for p in out.glob(".probe-*"):
            p.unlink(missing_ok=True)


def _ingest_leftover(entry: Path) -> bool:
    """What an ingest stopped before cache.json leaves behind (a re-run redoes it): the lock, a write
    probe, views.parquet (written just before cache.json: a full disk can strike in between), and images/
    holding only image tars (finished or .tmp) and their index."""
    if entry.name in (LOCK_FILE, VIEWS_FILE) or entry.name.startswith(".write-test-"):
        return True
    if entry.name != "images" or not entry.is_dir():
        return False
    return all(
        re.fullmatch(r"images-\d{6}\.tar(\.tmp)?|index\.parquet", p.name) and p.is_file()
        for p in entry.iterdir()
    )


def check_out_dir(out: Path) -> None:
    """--out must be a cache, empty, missing, or what an interrupted ingest left: never a folder of the
    user's (a cache written into it would overwrite and mix with their files)."""
    if out.is_dir() and not (out / CACHE_FILE).exists():
        foreign = sorted(p.name for p in out.iterdir() if not _ingest_leftover(p))
        if foreign:
            raise SakError(
                f"--out {out} is a non-empty folder that is not a SAK cache (it holds {foreign[0]!r}"
                f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); pass a new or empty "
                f"folder as --out"
            )
    if out.exists() and not out.is_dir():
        raise SakError(f"--out {out} is a file, not a folder; pass a new or empty folder as --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        error = write_error(e, out)
        raise error or SakError(
            f"cannot write to output folder {out}: {e.strerror}; pass a writable --out"
        ) from e
