"""Caches in object storage, against a real S3 server (moto, on 127.0.0.1, started and stopped by the
`s3_server` fixture): `run` writes every object whole into the bucket, `verify`, `inspect` and `ls` read
the bucket, and stage-1 training streamed from the bucket equals training from a local copy."""

from __future__ import annotations

import json

import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import STAGE_ENV, pull
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHERS = ("dinov2_tiny",)  # one tiny teacher, four images: the extraction takes seconds


@pytest.fixture(scope="module")
def bucket_cache(s3_server, ray_local, photo_dir, tmp_path_factory):
    """A tiny Zarr cache extracted straight into the bucket (the driver's mirror in a temporary folder)."""
    import os

    os.environ[STAGE_ENV] = str(tmp_path_factory.mktemp("stage"))
    url = s3_server("sak-cloud") + "/team/tiny"
    cfg = ExtractConfig(
        source=str(photo_dir), out=url, teachers=TEACHERS, size=64, shard_size=4, limit=4, progress=False,
        views_per_image=2,
    )  # fmt: skip
    run_extraction(cfg)
    yield url
    os.environ.pop(STAGE_ENV, None)


def test_run_writes_the_cache_into_the_bucket(bucket_cache, capsys):
    objects = Bucket(bucket_cache).listing()
    assert "cache.json" in objects and "views.parquet" in objects and ".sak-lock" not in objects
    cache = json.loads(Bucket(bucket_cache).read_bytes("cache.json"))
    assert len(cache["stores"]) == 1 and all(s["complete"] for s in cache["stores"].values())
    for fp in cache["stores"]:  # every recorded shard file is an object of the bucket
        manifest = json.loads(Bucket(bucket_cache).read_bytes(f"teachers/{fp}/manifest.json"))
        assert manifest["complete"] and manifest["shards"]
        for shard in manifest["shards"]:
            for rel in shard["files"]:
                assert objects[f"teachers/{fp}/{rel}"] == manifest["files"][rel]["bytes"]
    for rel in objects:  # no credential in any metadata object (manifests record the run's config)
        if not rel.endswith((".tar", ".npy")) and "/c/" not in rel:
            text = Bucket(bucket_cache).read_bytes(rel)
            assert b"sak-test-secret-key-not-real" not in text and b"sak-test-key-id" not in text, rel
    assert cache_main(["verify", bucket_cache]) == 0
    assert f"{bucket_cache}: OK" in capsys.readouterr().out
    assert cache_main(["inspect", bucket_cache]) == 0
    text = capsys.readouterr().out
    assert bucket_cache in text and "dinov2_tiny" in text


def test_ls_lists_caches_under_a_prefix(bucket_cache, capsys):
    prefix = bucket_cache.rsplit("/", 1)[0]
    assert cache_main(["ls", prefix]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(bucket_cache) and "8 views" in line and "created 20" in line
    assert "dinov2_tiny" in line and line.endswith("records ok")


def test_verify_finds_a_damaged_object_in_the_bucket(bucket_cache, s3_server, tmp_path, capsys):
    copy = s3_server("sak-cloud") + "/team/damaged"
    local = tmp_path / "c"
    pull(Bucket(bucket_cache), local, bulk=True)
    objects = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    shard = next(rel for rel in objects if "/c/" in rel)
    data = bytearray((local / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (local / shard).write_bytes(bytes(data))
    for rel in objects:
        Bucket(copy).put_whole(local / rel, rel)
    assert cache_main(["verify", copy]) == 1
    assert shard.split("/", 2)[-1] in capsys.readouterr().out


def test_stage1_streams_from_the_bucket_as_from_a_local_copy(bucket_cache, tmp_path):
    local = tmp_path / "copy"
    pull(Bucket(bucket_cache), local, bulk=True)
    kw = dict(steps=4, batch_size=4, eval_every=0, holdout_shards=1)
    from_local = train_stage1(Stage1Config.debug(str(local), str(tmp_path / "r_local"), **kw))
    lc = tmp_path / "lc"
    from_bucket = train_stage1(
        Stage1Config.debug(bucket_cache, str(tmp_path / "r_s3"), local_cache=str(lc), **kw)
    )
    assert len(from_bucket.losses) == 4 and from_bucket.losses == from_local.losses
    assert any(p.suffix == ".tar" for p in (lc / "images").iterdir())  # shards were read through lc
    record = json.loads((tmp_path / "r_s3" / "config.json").read_text())["cache"]
    assert record["url"] == bucket_cache
    cache = json.loads(Bucket(bucket_cache).read_bytes("cache.json"))
    assert {s["fingerprint"]: s["manifest_sha256"] for s in record["stores"]} == {
        fp: e["manifest_sha256"] for fp, e in cache["stores"].items()
    }
    from sak.student.train.evaluate import repsim_of_checkpoint

    sims_bucket, n = repsim_of_checkpoint(tmp_path / "r_s3", bucket_cache)
    assert n > 0 and sims_bucket == repsim_of_checkpoint(tmp_path / "r_s3", str(local))[0]
    for log_file in (tmp_path / "r_s3").rglob("*"):  # no credential in anything the run wrote
        if log_file.is_file():
            text = log_file.read_bytes()
            assert b"sak-test-secret-key-not-real" not in text and b"sak-test-key-id" not in text


def test_a_second_writer_is_refused_by_the_lock_object(bucket_cache):
    from sak.pipeline.buckets.lock import BucketLock

    with BucketLock(Bucket(bucket_cache)):
        cfg = ExtractConfig(
            views_per_image=2, source=None, out=bucket_cache, teachers=("sam_tiny",), size=64, progress=False
        )
        with pytest.raises(SakError, match="being written by another sak-cache run"):
            run_extraction(cfg)


def _read_passes(index, passes: int) -> tuple[object, list[int]]:
    """Read every training batch (of 2) `passes` times; the fetcher and its downloaded bytes after each."""
    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.order import make_stream_plan

    reader = BatchReader(index, index.plan.size, *input_normalization("imagenet", "tiny"))
    plan = make_stream_plan(index, 2, holdout_shards=0)
    fetched = []
    for _ in range(passes):
        for t in range(plan.epoch_length // 2):
            reader.read(plan.batch(t)[0])
        fetched.append(reader.fetcher.fetched_bytes)
    return reader.fetcher, fetched


def _bulk_files(folder):
    return [p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".tar" or "/c/" in p.as_posix())]


def test_local_cache_is_read_through_and_bounded(bucket_cache, tmp_path):
    from sak.student.data.bucket_mirror import shard_objects
    from sak.student.data.opening import open_cache

    objects = Bucket(bucket_cache).listing()
    _, fetched = _read_passes(open_cache(bucket_cache, local_cache=str(tmp_path / "big")), passes=2)
    on_disk = sum(p.stat().st_size for p in _bulk_files(tmp_path / "big"))
    assert fetched[0] == on_disk > 0 and fetched[1] == fetched[0]  # the second epoch downloads nothing
    bound = 40_000  # bytes: less than one shard's objects
    index = open_cache(bucket_cache, local_cache=str(tmp_path / "small"), local_cache_gb=bound / 2**30)
    shard_bytes = max(
        sum(objects[rel] for rel in shard_objects(index, s, True)) for s in range(index.num_shards)
    )
    _, tight = _read_passes(index, passes=2)
    kept = sum(p.stat().st_size for p in _bulk_files(tmp_path / "small"))
    assert tight[1] > tight[0]  # evicted shards were fetched again in the second epoch
    assert kept <= 2 * shard_bytes  # at most the shards of the last batch


@pytest.fixture(scope="module")
def wds_bucket_cache(bucket_cache, s3_server, photo_dir):
    """The same tiny cache with a WebDataset store, in the bucket."""
    url = s3_server("sak-cloud") + "/team/tiny-wds"
    cfg = ExtractConfig(
        views_per_image=2, source=str(photo_dir), out=url, teachers=TEACHERS, size=64, shard_size=4, limit=4, progress=False,
        format="wds",
    )  # fmt: skip
    run_extraction(cfg)
    return url


def _same_batches(a: dict, b: dict) -> None:
    import torch

    assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["images"], b["images"])
    for teacher, levels in b["targets"].items():
        assert all(torch.equal(x, y) for x, y in zip(a["targets"][teacher], levels))


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_without_local_cache_only_the_needed_byte_ranges_are_read(fmt, request, tmp_path):
    import numpy as np

    from sak.student.data.batches import BatchReader
    from sak.student.data.bucket_mirror import shard_objects
    from sak.student.data.loader import CacheStream
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache
    from sak.student.data.order import make_stream_plan

    url = request.getfixturevalue("bucket_cache" if fmt == "zarr" else "wds_bucket_cache")
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    norm = input_normalization("imagenet", "tiny")
    index = open_cache(url)  # no --local-cache: read in place
    assert index.ranged and index.stores[0].format == fmt
    ranged, on_disk = BatchReader(index, 64, *norm), BatchReader(open_cache(str(local)), 64, *norm)
    objects = Bucket(url).listing()
    shard_bytes = sum(objects[rel] for rel in shard_objects(index, 0, True))
    rows = np.array([1, 0])  # both views of image 0: half of shard 0
    _same_batches(ranged.read(rows), on_disk.read(rows))
    print(f"{fmt}: read {ranged.ranged.fetched_bytes} of shard 0's {shard_bytes} bytes")
    assert 0 < ranged.ranged.fetched_bytes < 0.75 * shard_bytes
    assert not _bulk_files(index.root)  # nothing but metadata was written locally
    plan = make_stream_plan(index, 2, holdout_shards=0)  # a whole epoch, each next batch read ahead
    stream, reference = CacheStream(plan, BatchReader(index, 64, *norm)), CacheStream(plan, on_disk)
    for t in range(plan.epoch_length // 2):
        _same_batches(stream.batch(t), reference.batch(t))
    assert stream.reader.ranged.fetched_bytes <= sum(
        objects[rel] for rel in objects if "/c/" in rel or rel.endswith(".tar")
    )


def test_a_range_read_refuses_an_object_cut_short(bucket_cache, s3_server, tmp_path):
    """Without --local-cache no whole object is hashed, but every object must have its recorded size."""
    import numpy as np

    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache

    copy = s3_server("sak-cloud") + "/team/cut-short"
    local = tmp_path / "c"
    pull(Bucket(bucket_cache), local, bulk=True)
    objects = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    shard = next(rel for rel in objects if "/levels/" in rel and "/c/0/" in rel)  # shard 0
    (local / shard).write_bytes((local / shard).read_bytes()[:-16])
    for rel in objects:
        Bucket(copy).put_whole(local / rel, rel)
    reader = BatchReader(open_cache(copy), 64, *input_normalization("imagenet", "tiny"))
    assert reader.ranged is not None
    with pytest.raises(SakError, match=r"recorded \(replaced or cut short\)") as info:
        reader.read(np.array([0, 1]))
    assert shard.split("/", 2)[-1] in str(info.value) and "\n" not in str(info.value)


def test_student_views_raw_into_the_bucket(s3_server, ray_local, photo_dir, tmp_path, capsys):
    import numpy as np

    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache

    url = s3_server("sak-cloud") + "/team/tiny-raw"
    cfg = ExtractConfig(
        views_per_image=2, source=str(photo_dir), out=url, teachers=TEACHERS, size=64, shard_size=4, limit=4, progress=False,
        student_views="raw",
    )  # fmt: skip
    run_extraction(cfg)
    cache = json.loads(Bucket(url).read_bytes("cache.json"))
    objects = Bucket(url).listing()
    shards = cache["student_views"]["shards"]
    assert len(shards) == cache["num_shards"] == 2 and all(s["file"] in objects for s in shards)
    assert cache_main(["verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    norm, rows = input_normalization("imagenet", "tiny"), np.array([5, 2, 7])
    reference = BatchReader(open_cache(str(local)), 64, *norm)
    for lc in (None, str(tmp_path / "lc")):  # by range in place, and read through a local cache
        reader = BatchReader(open_cache(url, local_cache=lc), 64, *norm)
        assert reader.raw_views() is not None  # the stored pixels are what it reads
        _same_batches(reader.read(rows), reference.read(rows))
    assert all((tmp_path / "lc" / s["file"]).is_file() for s in shards)
