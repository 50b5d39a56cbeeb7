"""Object-store locations through fsspec against a real (local, moto) S3 server: whole-object uploads
checked against the local bytes, mirrors, and the lock object (conditional create, owner, expiry)."""

from __future__ import annotations

import json

import pytest

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.lock import BucketLock
from sak.pipeline.buckets.mirror import is_bulk, pull, push, stage_dir


def test_locations_and_bulk_objects():
    assert is_url("s3://b/p") and is_url("gs://b/p") and not is_url("/tmp/x") and not is_url("rel/x")
    assert stage_dir("s3://b/p") == stage_dir("s3://b/p/") != stage_dir("s3://b/q")
    assert is_bulk("images/000001.tar") and is_bulk("teachers/x/shards/000003.tar")
    assert is_bulk("teachers/x/levels/2/c/0/0/0/0") and not is_bulk("teachers/x/levels/2/zarr.json")
    assert not is_bulk("teachers/x/journal.jsonl") and not is_bulk("cache.json")


def test_whole_objects_round_trip(s3_server, tmp_path):
    b = Bucket(s3_server("storage-rt") + "/caches/one")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "cache.json").write_text('{"a": 1}')
    (src / "images" / "000000.tar").write_bytes(bytes(range(256)) * 40)
    digests = push(b, src, ["cache.json", "images/000000.tar"])
    assert b.listing() == {"cache.json": 8, "images/000000.tar": 10240}
    assert len(digests["images/000000.tar"]) == 64
    meta = tmp_path / "meta"
    pull(b, meta, bulk=False)
    assert (meta / "cache.json").read_text() == '{"a": 1}' and not (meta / "images").exists()
    full = tmp_path / "full"
    pull(b, full, bulk=True)
    assert (full / "images" / "000000.tar").read_bytes() == (src / "images" / "000000.tar").read_bytes()
    with pytest.raises(SakError, match="does not exist"):
        b.read_bytes("nope.json")


def test_lock_object_one_writer(s3_server):
    b = Bucket(s3_server("storage-lock") + "/c")
    first = BucketLock(b).acquire()
    holder = json.loads(b.read_bytes(LOCK_FILE))
    assert holder["owner"] == first.owner and holder["expires"] > holder["pid"] * 0
    with pytest.raises(SakError, match="being written by another sak-cache run"):
        BucketLock(b).acquire()
    first.release()
    assert not b.exists(LOCK_FILE)
    with BucketLock(b):  # free again
        assert b.exists(LOCK_FILE)


def test_lock_of_a_dead_holder_is_taken_over(s3_server):
    b = Bucket(s3_server("storage-lock") + "/dead")
    stale = BucketLock(b, ttl_s=-1).acquire()  # already expired: its holder stopped refreshing it
    stale.held = False  # as after kill -9: nobody releases it
    with BucketLock(b) as lock:
        assert json.loads(b.read_bytes(LOCK_FILE))["owner"] == lock.owner


def testnode_probe_sees_the_drivers_file_and_writes_its_own(tmp_path):
    from sak.pipeline.extraction.probe import node_probe  # what each node runs before a local --out is used

    assert node_probe(str(tmp_path), ".probe-driver-1", "nodeA") == "cannot see the driver's files"
    (tmp_path / ".probe-driver-1").write_text("driver")
    assert node_probe(str(tmp_path), ".probe-driver-1", "nodeA") is None
    assert (tmp_path / ".probe-nodeA").read_text() == "nodeA"
