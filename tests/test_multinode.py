"""Multi-node extraction into object storage, for real on one machine (slow tier): a Ray cluster of a head
and a second node (tests/multinode_driver.py, in its own process), teacher actors on both nodes, writing
into the session's S3 server; the second node killed mid-run; the driver killed with SIGKILL mid-run.
Each test prints what it saw (shards journaled before and after, views counted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import pull
from sak.pipeline.sources.synthetic import make_photo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multinode_driver.py"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mn_photos")
    for i in range(12):
        make_photo(i, 96 + 8 * i, 120 - 4 * i).save(root / f"p{i:02d}.png")
    return root


def _drive(url: str, photos: Path, tmp: Path, name: str, **kw) -> dict:
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(DRIVER), "--url", url, "--source", str(photos), "--result", str(result)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "SAK_STAGE_DIR": str(tmp / f"stage-{name}"), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(result.read_text())
    seen["warnings"] = [line for line in proc.stderr.splitlines() if "was lost" in line]
    return seen


def _views_once(url: str) -> dict:
    """Every view of the cache in exactly one recorded shard of each store, each shard's files in the
    bucket with their recorded sizes. Returns the counts."""
    bucket = Bucket(url)
    objects = bucket.listing()
    cache = json.loads(bucket.read_bytes("cache.json"))
    counts = {}
    for fp in cache["stores"]:
        m = json.loads(bucket.read_bytes(f"teachers/{fp}/manifest.json"))
        rows = sorted(r for s in m["shards"] for r in range(s["start"], s["stop"]))
        assert rows == list(range(cache["num_views"])), f"{fp}: views not covered exactly once"
        for s in m["shards"]:
            for rel in s["files"]:
                assert objects[f"teachers/{fp}/{rel}"] == m["files"][rel]["bytes"]
        counts[fp] = {"shards": len(m["shards"]), "views": len(rows)}
    return counts


def test_two_nodes_into_the_bucket_then_verify_and_train(s3_server, photos, tmp_path, capsys):
    from sak.student.train.stage1 import train_stage1
    from sak.student.train.stage1_config import Stage1Config

    url = s3_server("sak-multinode") + "/two"
    seen = _drive(url, photos, tmp_path, "two", head_cpus=1)  # SPREAD is best effort: force one actor each
    assert seen["finished"] and sorted(seen["writers"]) == sorted([seen["head"], seen["node_b"]]), seen[
        "warnings"
    ]
    assert cache_main(["verify", url]) == 0
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    kw = dict(steps=4, batch_size=4, eval_every=0, holdout_shards=1)
    a = train_stage1(Stage1Config.debug(url, str(tmp_path / "r_s3"), local_cache=str(tmp_path / "lc"), **kw))
    b = train_stage1(Stage1Config.debug(str(local), str(tmp_path / "r_local"), **kw))
    assert len(a.losses) == 4 and a.losses == b.losses
    with capsys.disabled():
        print(f"\ntwo nodes: shards written by {seen['writers']}; {_views_once(url)}; losses {a.losses}")


def test_two_nodes_write_one_pca_store(s3_server, photos, tmp_path, capsys):
    """pca<k> on two nodes: one worker fits the basis on shard 0 and uploads it before any other shard is
    given out; the other node's worker fetches it from the bucket and encodes its shards over it."""
    from sak.student.train.stage1 import train_stage1
    from sak.student.train.stage1_config import Stage1Config

    url = s3_server("sak-multinode") + "/pca"
    seen = _drive(url, photos, tmp_path, "pca", codec="pca8", head_cpus=1)
    assert seen["finished"] and sorted(seen["writers"]) == sorted([seen["head"], seen["node_b"]]), seen
    assert cache_main(["verify", url]) == 0
    objects = Bucket(url).listing()
    assert any("/basis/" in rel for rel in objects)
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    kw = dict(steps=3, batch_size=4, eval_every=0, holdout_shards=1)
    a = train_stage1(Stage1Config.debug(url, str(tmp_path / "r_s3"), **kw))
    b = train_stage1(Stage1Config.debug(str(local), str(tmp_path / "r_local"), **kw))
    assert len(a.losses) == 3 and a.losses == b.losses
    with capsys.disabled():
        print(
            f"\npca8 on two nodes: shards written by {seen['writers']}; {_views_once(url)}; losses {a.losses}"
        )


def test_worker_node_killed_mid_run(s3_server, photos, tmp_path, capsys):
    url = s3_server("sak-multinode") + "/nodefail"
    seen = _drive(url, photos, tmp_path, "fail", kill_node_after=2)
    assert seen.get("node_b_removed"), seen
    total = 12  # 12 images x 2 views in shards of 2
    assert seen["journaled_at_kill"] < total, "the run finished before the node was killed"
    if not seen["finished"]:  # a clear message, then a re-run finishes
        assert "re-run the same command" in seen["error"]
        rerun = _drive(url, photos, tmp_path, "rerun")
        assert rerun["finished"]
    assert cache_main(["verify", url]) == 0
    counts = _views_once(url)
    assert all(c == {"shards": total, "views": 2 * total} for c in counts.values())
    with capsys.disabled():
        print(
            f"\nnode failure: {seen['journaled_at_kill']} shards journaled when node B was killed, "
            f"finished on the remaining node: {seen['finished']} ({seen.get('error', '')}); "
            f"journaled after: {seen['journaled_after']}; verify OK; {counts}"
        )


def test_driver_killed_then_rerun_skips_journaled_shards(s3_server, photos, tmp_path, capsys):
    from multinode_driver import journaled

    url = s3_server("sak-multinode") + "/driverkill"
    cmd = [sys.executable, "-m", "sak.cli.cache", "run", "--source", str(photos), "--out", url,
           "--teachers", "dinov2_tiny", "--size", "64", "--views-per-image", "2", "--shard-size", "2", "--batch-size", "2",
           "--object-store-mb", "150", "--no-progress"]  # fmt: skip
    env = {**os.environ, "SAK_STAGE_DIR": str(tmp_path / "stage"), "RAY_USAGE_STATS_ENABLED": "0"}
    # its own session: the driver and the local Ray it starts form one process group, ours to kill
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while journaled(url) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (kill -9) and the Ray it started
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    before = journaled(url)
    assert 2 <= before < 12
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    skipped = [line for line in rerun.stderr.splitlines() if "already done" in line]
    assert skipped and int(skipped[0].split("skipping ")[1].split()[0]) >= before, rerun.stderr[-2000:]
    assert "taking over" in rerun.stderr  # the dead driver's lock object
    assert cache_main(["verify", url]) == 0
    counts = _views_once(url)
    assert all(c == {"shards": 12, "views": 24} for c in counts.values())
    with capsys.disabled():
        print(f"\ndriver kill -9: {before} shards journaled before; re-run: {skipped[0].strip()}; {counts}")
