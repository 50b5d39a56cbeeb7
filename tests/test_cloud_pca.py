"""pca<k> stores in a bucket, against the moto S3 server (`s3_server`): the worker that fits the basis on
shard 0 uploads it whole before the shard is journaled, `verify` checks it, readers (by range, and through
--local-cache) fetch it when they open the store, and a resumed run reuses it from the bucket."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import STAGE_ENV, pull
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.store.lowrank import fetch_bases
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = ("dinov2_tiny",)


def _config(url: str, photo_dir, **kw) -> ExtractConfig:
    return ExtractConfig(
        views_per_image=2, source=str(photo_dir), out=url, teachers=TEACHERS, size=64, shard_size=4, limit=4, progress=False,
        codec="pca8", **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pca_bucket(s3_server, ray_local, photo_dir, tmp_path_factory):
    """A tiny pca8 Zarr cache (two shards) extracted straight into the bucket."""
    import os

    os.environ[STAGE_ENV] = str(tmp_path_factory.mktemp("stage"))
    url = s3_server("sak-cloud-pca") + "/team/pca8"
    run_extraction(_config(url, photo_dir))
    yield url
    os.environ.pop(STAGE_ENV, None)


def _store(url: str) -> tuple[str, dict]:
    cache = json.loads(Bucket(url).read_bytes("cache.json"))
    (fp,) = cache["stores"]
    return f"teachers/{fp}", json.loads(Bucket(url).read_bytes(f"teachers/{fp}/manifest.json"))


def _basis_objects(url: str) -> dict[str, tuple[str, object]]:
    """Every basis object of the store: rel -> (sha256 of its bytes, last modified)."""
    import hashlib

    bucket = Bucket(url)
    rel, _ = _store(url)
    out = {}
    for key in bucket.listing(f"{rel}/basis"):
        info = bucket.fs.info(bucket.key(key))
        out[key] = (hashlib.sha256(bucket.read_bytes(key)).hexdigest(), info.get("LastModified"))
    return out


def test_a_pca_cache_is_extracted_into_the_bucket_and_verifies(pca_bucket, capsys):
    rel, manifest = _store(pca_bucket)
    assert manifest["complete"] and manifest["codec"] == "pca8" and len(manifest["shards"]) == 2
    basis = _basis_objects(pca_bucket)
    # every level's mean and components chunk (and the Zarr metadata) is an object, recorded in the manifest
    chunks = [k for k in basis if "/c/" in k]
    assert len(chunks) == 2 * len(manifest["levels"])
    for key, (digest, _) in basis.items():
        assert manifest["files"][key[len(rel) + 1 :]]["sha256"] == digest
    assert cache_main(["verify", pca_bucket]) == 0
    assert f"{pca_bucket}: OK" in capsys.readouterr().out


def test_stage1_from_the_bucket_equals_a_local_copy(pca_bucket, tmp_path):
    local = tmp_path / "copy"
    pull(Bucket(pca_bucket), local, bulk=True)
    kw = dict(steps=3, batch_size=4, eval_every=0, holdout_shards=1)
    reference = train_stage1(Stage1Config.debug(str(local), str(tmp_path / "r_local"), **kw)).losses
    ranged = train_stage1(Stage1Config.debug(pca_bucket, str(tmp_path / "r_ranged"), **kw)).losses
    lc = tmp_path / "lc"
    through = train_stage1(
        Stage1Config.debug(pca_bucket, str(tmp_path / "r_lc"), local_cache=str(lc), **kw)
    ).losses
    assert len(reference) == 3 and ranged == reference and through == reference
    assert list(lc.glob("teachers/*/basis/*/components/c/0/0"))  # fetched whole when the store opened


def test_a_reader_refuses_a_damaged_basis_object(pca_bucket, s3_server, tmp_path):
    from sak.student.data.opening import open_cache

    copy = s3_server("sak-cloud-pca") + "/team/pca8-damaged"
    local = tmp_path / "c"
    pull(Bucket(pca_bucket), local, bulk=True)
    (chunk,) = [p for p in local.glob("teachers/*/basis/*/components/c/0/0")][:1]
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    for p in sorted(p for p in local.rglob("*") if p.is_file()):
        Bucket(copy).put_whole(p, p.relative_to(local).as_posix())
    with pytest.raises(SakError, match="pca basis file"):
        open_cache(copy)


def test_a_worker_without_the_basis_fetches_it_whole(pca_bucket, tmp_path):
    rel, _ = _store(pca_bucket)
    store = Bucket(pca_bucket).sub(rel)
    assert fetch_bases(store, tmp_path) and not list(tmp_path.glob(".basis*"))
    for key, (digest, _) in _basis_objects(pca_bucket).items():
        import hashlib

        assert hashlib.sha256((tmp_path / key[len(rel) + 1 :]).read_bytes()).hexdigest() == digest
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not fetch_bases(Bucket(pca_bucket).sub("teachers/none"), empty) and not list(empty.iterdir())


def _copy_to(src: str, dst: str, tmp, skip: str = "") -> None:
    local = tmp / dst.rsplit("/", 1)[1]
    pull(Bucket(src), local, bulk=True)
    for p in sorted(p for p in local.rglob("*") if p.is_file()):
        key = p.relative_to(local).as_posix()
        if not (skip and skip in key):
            Bucket(dst).put_whole(p, key)


def test_a_resumed_run_reuses_the_basis_in_the_bucket(pca_bucket, s3_server, photo_dir, tmp_path, capsys):
    url = s3_server("sak-cloud-pca") + "/team/pca8-resume"
    _copy_to(pca_bucket, url, tmp_path)
    rel, manifest = _store(url)
    bucket = Bucket(url)
    journal = bucket.read_bytes(f"{rel}/shards.jsonl").decode().splitlines()
    (tmp_path / "shards.jsonl").write_text(journal[0] + "\n")  # as if the run stopped after shard 0
    bucket.put_whole(tmp_path / "shards.jsonl", f"{rel}/shards.jsonl")
    shard1 = [f for s in manifest["shards"] if s["index"] == 1 for f in s["files"]]
    for f in shard1:
        bucket.delete(f"{rel}/{f}")
    before = _basis_objects(url)
    assert before and all(modified is not None for _, modified in before.values())
    run_extraction(_config(url, photo_dir))
    assert _basis_objects(url) == before  # not refitted, not re-uploaded
    _, resumed = _store(url)
    assert resumed["complete"] and len(resumed["shards"]) == 2
    for f in shard1:  # shard 1 encoded again over the same basis: the same bytes
        assert resumed["files"][f]["sha256"] == manifest["files"][f]["sha256"]
    assert cache_main(["verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out


def test_a_basis_upload_cut_short_before_any_shard_is_refitted(pca_bucket, s3_server, photo_dir, tmp_path):
    url = s3_server("sak-cloud-pca") + "/team/pca8-cut"
    _copy_to(pca_bucket, url, tmp_path)
    rel, _ = _store(url)
    bucket, before = Bucket(url), _basis_objects(url)
    bucket.delete(f"{rel}/shards.jsonl")  # no shard journaled, and the last level's metadata never landed
    last = max(k for k in before if k.endswith("/components/zarr.json"))
    bucket.delete(last)
    run_extraction(_config(url, photo_dir))
    after = _basis_objects(url)
    assert sorted(after) == sorted(before) and after[last][0] == before[last][0]
    assert cache_main(["verify", url]) == 0


def test_a_bucket_store_that_lost_its_basis_is_refused(pca_bucket, s3_server, photo_dir, tmp_path):
    url = s3_server("sak-cloud-pca") + "/team/pca8-nobasis"
    _copy_to(pca_bucket, url, tmp_path, skip="/basis/")
    with pytest.raises(SakError, match=r"records 2 shard\(s\) but its pca basis \(basis/\) is missing"):
        run_extraction(_config(url, photo_dir))


def test_a_wds_pca_store_in_the_bucket_reads_as_a_local_copy(pca_bucket, s3_server, photo_dir, tmp_path):
    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache

    url = s3_server("sak-cloud-pca") + "/team/pca8-wds"
    run_extraction(_config(url, photo_dir, format="wds"))
    _, manifest = _store(url)
    assert (
        manifest["complete"]
        and "basis/" + str(manifest["levels"][0]["block"]) + ".mean.npy" in (manifest["files"])
    )
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    norm, rows = input_normalization("imagenet", "tiny"), np.array([5, 2, 7])
    reference = BatchReader(open_cache(str(local)), 64, *norm).read(rows)
    for lc in (None, str(tmp_path / "lc")):
        got = BatchReader(open_cache(url, local_cache=lc), 64, *norm).read(rows)
        for teacher, levels in reference["targets"].items():
            assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(got["targets"][teacher], levels))
