"""Stage-2 target caches in a bucket (the moto S3 server of `s3_server`): `sak-cache stage2 --out s3://...`
writes every shard object whole and journals it after the upload; `verify`, `inspect` and `ls` read the
bucket; `sak-train stage2 --cache URL` and `sak-train tiger --cache URL` read the targets in place and train
exactly as from a local copy of the same cache."""

from __future__ import annotations

import json

import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import STAGE_ENV, pull
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from sak.student.train.tiger import train_tiger
from sak.student.train.tiger_config import TigerConfig
from tests.test_datasets import make_folder

NAMES = [f"img{i}" for i in range(5)]  # 4 training images, 1 for validation
CROP = (48, 64)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bucket_s2(s3_server, tiny_stage1_run, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("s2bucket")
    monkeypatch_module.setenv(STAGE_ENV, str(root / "stage"))
    (root / "s1").symlink_to(tiny_stage1_run, target_is_directory=True)  # shared, read-only
    folder = make_folder(root / "data", names=NAMES)
    url = s3_server("sak-stage2") + "/team/s2"
    args = ["stage2", "--dataset", "folder", "--data-root", str(folder), "--init", str(root / "s1"),
            "--out", url, "--epochs", "2", "--img-size", f"{CROP[0]}x{CROP[1]}", "--codec", "fp32",
            "--shard-size", "3", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert cache_main(args) == 0
    local = root / "copy"
    pull(Bucket(url), local, bulk=True)
    return root, folder, url, local, args


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_stage2_cache_is_written_whole_into_the_bucket(bucket_s2, capsys):
    root, _, url, local, args = bucket_s2
    objects = Bucket(url).listing()
    cache = json.loads(Bucket(url).read_bytes("cache.json"))
    assert cache["kind"] == "sak-stage2-cache" and cache["complete"] and ".sak-lock" not in objects
    for t in cache["teachers"]:  # every recorded shard file is an object, journaled once per shard
        assert sorted(int(s) for s in t["shards"]) == list(range(cache["num_shards"]))
        for files in t["shards"].values():
            assert all(f"{t['path']}/{rel}" in objects for rel in files)
        journal = Bucket(url).read_bytes(f"{t['path']}/shards.jsonl").decode().splitlines()
        assert len(journal) == cache["num_shards"]
    capsys.readouterr()
    assert cache_main(["verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out
    assert cache_main(["inspect", url]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"stage-2 cache {url}") and "sam_tiny" in text and " 0 B" not in text
    assert cache_main(["ls", url.rsplit("/", 1)[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{url}  stage-2 folder: 8 rows") and "dinov2_tiny" in line
    before = Bucket(url).read_bytes("teachers/sam_tiny/shards.jsonl")
    assert cache_main(args) == 0  # complete: a re-run redoes nothing
    assert Bucket(url).read_bytes("teachers/sam_tiny/shards.jsonl") == before
    assert cache_main([*args[:-2], "--seed", "1"]) == 2  # another plan into the same prefix: refused


def test_ray_actors_write_the_same_bucket_cache_from_their_node_mirrors(bucket_s2, ray_local, capsys):
    """--workers 1: a Ray actor writes each shard in its node's mirror and uploads it whole before the
    driver journals it; the cache equals the one built in the driver's process, object for object."""
    _, _, url, _, args = bucket_s2
    other = url.rsplit("/", 1)[0] + "/s2_actors"
    assert cache_main([*[other if a == url else a for a in args], "--workers", "1"]) == 0
    a, b = (json.loads(Bucket(u).read_bytes("cache.json")) for u in (url, other))
    assert [t["shards"] for t in a["teachers"]] == [t["shards"] for t in b["teachers"]]
    assert a["views_sha256"] == b["views_sha256"] and a["identity"] == b["identity"]
    capsys.readouterr()
    assert cache_main(["verify", other]) == 0 and f"{other}: OK" in capsys.readouterr().out


def test_stage2_and_tiger_train_from_the_bucket_as_from_a_local_copy(bucket_s2):
    root, folder, url, local, _ = bucket_s2
    kw = {"steps": 3, "batch_size": 2, "img_size": CROP, "lr": 1e-3, "device": "cpu"}
    sources = (("local", str(local)), ("bucket", url))
    runs = {
        where: train_stage2(Stage2Config.debug("folder", str(folder), str(root / "s1"), str(root / f"r_{where}"), cache=cache, **kw))
        for where, cache in sources
    }  # fmt: skip
    assert len(runs["bucket"].losses) == 3 and runs["bucket"].losses == runs["local"].losses
    assert all(r["distill"] > 0 for r in runs["bucket"].records)
    kw = {"steps": 2, "img_size": CROP, "device": "cpu", "checkpoint_every": 0}
    tiger = {
        where: train_tiger(TigerConfig.debug("folder", str(folder), str(root / f"t_{where}"), cache=cache, **kw))
        for where, cache in sources
    }  # fmt: skip
    losses = {where: [r["task_loss"] for r in t.records] for where, t in tiger.items()}
    assert len(losses["bucket"]) == 2 and losses["bucket"] == losses["local"]
    assert json.loads((root / "t_bucket/config.json").read_text())["teachers"]["cache"] == url
