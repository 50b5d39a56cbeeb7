"""Is --out usable: a local folder writable here and (on a multi-node Ray cluster) one folder every node
sees; a bucket every Ray node can write and read (each with its own credentials)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sak.pipeline.base.errors import SakError, one_line
from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.base.oserrors import write_error
from sak.pipeline.buckets.access import write_probe
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


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _on_each_node(nodes: list[dict], fn, *args) -> dict[str, tuple[str, object]]:
    """Run fn(*args, node) once on each of these Ray nodes (a zero-CPU task pinned there): node id (12
    characters) -> (its address, its result)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn)
    refs = {
        n["NodeID"][:12]: (
            n["NodeManagerAddress"],
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                *args, n["NodeID"][:12]
            ),
        )
        for n in nodes
    }
    return {node: (address, ray.get(ref)) for node, (address, ref) in refs.items()}


def probe_nodes(out: Path) -> None:
    """A local --out on a Ray cluster must be one folder shared by every node: each alive node reads the
    driver's probe file and writes one back before any work; otherwise refuse, naming the node."""
    nodes = _alive_nodes()
    if len(nodes) < 2:
        return
    driver_probe = f".probe-driver-{os.getpid()}"
    (out / driver_probe).write_text("driver")
    try:
        for node, (address, problem) in _on_each_node(nodes, node_probe, str(out), driver_probe).items():
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


def bucket_node_probe(url: str, node: str) -> str | None:
    """On one node: put a probe object under the cache's prefix, read it back and delete it, with this
    node's own credentials (its processes have the environment `ray start` gave them, not the driver's).
    None when that works, else the problem in one line; never raises (a Ray task's traceback is noise)."""
    try:
        return write_probe(url, f"node-{node}")
    except Exception as e:  # e.g. the store's library missing on this node
        return f"{type(e).__name__}: {one_line(e)}"


def probe_bucket_nodes(url: str) -> None:
    """A URL --out: every alive Ray node (one included: it may not be this machine) must write and read
    the bucket before any work (extraction tasks and actors write shards there); otherwise refuse,
    naming the node and the fix."""
    for node, (address, problem) in _on_each_node(_alive_nodes(), bucket_node_probe, url).items():
        if problem:
            raise SakError(
                f"node {node} ({address}) cannot write {url}: {problem}; every node needs the driver's "
                f"bucket credentials (the same environment where `ray start` runs, a KubeRay Secret, or an "
                f"instance role / service account)"
            )


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
