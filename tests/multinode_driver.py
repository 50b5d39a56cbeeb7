"""Driver of the multi-node tests (run as a subprocess: it needs its own Ray, not the session's).

A Ray cluster of a head and a second node on this machine (ray.cluster_utils.Cluster, each node with its
own raylet, object store and worker processes), one `sak-cache run` into a bucket with one teacher actor
per node (SPREAD), and optionally the second node removed (its raylet and workers killed) once the bucket
journals hold --kill-node-after shards. Writes what it saw as JSON to --result; stops the cluster on exit.

The bucket's endpoint and credentials come from the standard AWS_* environment (the test's S3 server).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def journaled(url: str) -> int:
    """Shard records in the bucket's journals, over all stores."""
    from sak.pipeline.buckets.bucket import Bucket

    bucket = Bucket(url)
    lines = 0
    for rel in bucket.listing("teachers"):
        if rel.endswith("shards.jsonl"):
            lines += len(bucket.read_bytes(rel).decode().splitlines())
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--teachers", default="dinov2_tiny")
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument(
        "--head-cpus",
        type=int,
        default=2,
        help="1: room for one teacher actor only, so the other lands on node B",
    )
    ap.add_argument("--kill-node-after", type=int, default=0, help="remove node B after N journaled shards")
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from sak.pipeline.base.errors import SakError
    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.extraction.driver import run_extraction

    mb = 1024 * 1024
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "object_store_memory": 120 * mb}
    )
    node_b = cluster.add_node(num_cpus=2, object_store_memory=120 * mb, resources={"node_b": 1})
    cluster.wait_for_nodes()
    # Cluster names itself in /tmp/ray/ray_current_cluster, where any plain ray.init() on this machine would
    # find and join it: remove that entry (written just now, by this process) so other jobs do not.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip() == cluster.head_node.gcs_address:
        current.unlink()
    result: dict = {"head": cluster.head_node.node_id[:12], "node_b": node_b.node_id[:12]}
    killer = None
    if args.kill_node_after:

        def kill_when_ready() -> None:
            while journaled(args.url) < args.kill_node_after:
                time.sleep(0.05)
            result["journaled_at_kill"] = journaled(args.url)
            cluster.remove_node(node_b, allow_graceful=False)  # its raylet and workers, killed
            result["node_b_removed"] = True

        killer = threading.Thread(target=kill_when_ready, daemon=True)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        if killer:
            killer.start()
        cfg = ExtractConfig(
            views_per_image=2,
            source=args.source,
            out=args.url,
            teachers=tuple(args.teachers.split(",")),
            size=64,
            shard_size=args.shard_size,
            codec=args.codec,
            batch_size=2,
            workers=2,
            address=cluster.address,
            progress=False,
        )
        try:
            run_extraction(cfg)
            result["finished"] = True
        except SakError as e:
            result["finished"], result["error"] = False, str(e)
        result["journaled_after"] = journaled(args.url)
    finally:
        ray.shutdown()
        cluster.shutdown()
    stage = Path(os.environ["SAK_STAGE_DIR"])  # which nodes wrote teacher shards (their own mirrors)
    result["writers"] = sorted(
        d.name.rsplit("-node-", 1)[1]
        for d in stage.glob("*-node-*")
        if any(p.is_file() and "/levels/" in p.as_posix() for p in (d / "teachers").rglob("*"))
    )
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
