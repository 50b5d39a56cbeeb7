"""The stage-1 loader: views replayed as planned, the order (per epoch, per rank and worker, resumable),
targets joined to the right rows, and refusals of caches that do not fit together."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from PIL import Image

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.images import cut_view
from sak.pipeline.store.codecs import get_codec
from sak.pipeline.teachers.forward import IMAGENET_MEAN, IMAGENET_STD
from sak.student.data.batches import BatchReader, decode_targets
from sak.student.data.loader import CacheLoader
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache
from sak.student.data.order import StreamPlan, holdout_rows, make_stream_plan, stable_permutation

SIZE = 64
TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def cache(tiny_caches):
    """6 images x 2 views at 64 px, shards of 4 views (2 images): 3 shards, the last held out."""
    return tiny_caches.get(teachers=TEACHERS)


def _reader(index, **kw):
    mean, std = input_normalization("student", "tiny")
    return BatchReader(index, SIZE, mean, std, **kw)


# ------------------------------------------------------------------------------------ the order (pure)


def _plan(**kw) -> StreamPlan:
    base = dict(
        num_images=40, views_per_image=3, images_per_shard=4, train_shards=tuple(range(10)), batch_size=5
    )
    return StreamPlan(**{**base, **kw})


def test_stable_permutation_is_a_seeded_permutation():
    p = stable_permutation(100, 7, 3)
    assert sorted(p.tolist()) == list(range(100))
    assert (p == stable_permutation(100, 7, 3)).all()
    assert not (p == stable_permutation(100, 7, 4)).all()
    # pinned: the order must not drift with library versions (SplitMix64, not numpy's generators)
    assert stable_permutation(8, 0, 0).tolist() == GOLDEN_PERM


GOLDEN_PERM = [3, 6, 0, 2, 7, 1, 5, 4]


def test_epoch_e_uses_view_e_mod_k_and_every_image_once():
    plan = _plan(streams=2)  # 10 shards over 2 slots: 5 shards = 20 images each, all 40 per epoch
    assert plan.epoch_length == 20 and plan.samples_per_epoch == 40
    seen: dict[int, list[int]] = {}
    for t in range(2 * 3 * 20 // 5):  # three epochs of both streams
        rows, epochs = plan.batch(t)
        assert (rows % 3 == epochs % 3).all()  # epoch e replays view e mod K
        for r, e in zip(rows.tolist(), epochs.tolist()):
            seen.setdefault(e, []).append(r // 3)
    assert sorted(seen) == [0, 1, 2]
    for images in seen.values():
        assert sorted(images) == list(range(40))  # every image exactly once per epoch


def test_shuffle_is_deterministic_per_seed_and_epoch_and_differs_across_epochs():
    plan = _plan()
    assert (plan.slot_samples(0, 0) == _plan().slot_samples(0, 0)).all()
    assert not (plan.slot_samples(0, 0) == plan.slot_samples(1, 0)).all()
    assert not (plan.slot_samples(0, 0) == _plan(seed=1).slot_samples(0, 0)).all()
    batches = [plan.batch(t)[0].tolist() for t in range(4)]
    assert batches == [_plan().batch(t)[0].tolist() for t in range(4)]


@pytest.mark.parametrize("shards", [8, 11])
def test_ranks_and_streams_own_disjoint_shards_and_cover_the_epoch(shards):
    world, streams = 2, 2
    plans = [
        _plan(train_shards=tuple(range(shards)), world_size=world, rank=r, streams=streams)
        for r in range(world)
    ]
    per_epoch_full = shards % (world * streams) == 0
    for epoch in range(3):
        owned, images = [], []
        for plan in plans:
            for s in range(streams):
                samples = plan.slot_samples(epoch, plan.rank * streams + s)
                assert len(samples) == plan.epoch_length  # equal length: ranks step in lockstep
                owned.append(set((samples // 4).tolist()))
                images.append(samples)
        for i in range(len(owned)):
            for j in range(i + 1, len(owned)):
                assert not owned[i] & owned[j]  # whole shards per (rank, stream)
        flat = np.concatenate(images)
        assert len(set(flat.tolist())) == len(flat)  # no image twice in an epoch
        if per_epoch_full:
            assert sorted(flat.tolist()) == list(range(shards * 4))
    # the shard order changes with the epoch
    assert not (plans[0].slot_samples(0, 0) == plans[0].slot_samples(1, 0)).all()


def test_holdout_shards_are_never_trained_on(cache):
    index = open_cache(cache)
    plan = make_stream_plan(index, 3, num_workers=2, holdout_shards=1)
    held = set(holdout_rows(index, 1).tolist())
    assert held == set(range(8, 12))  # the last shard, both views
    trained = np.concatenate([plan.batch(t)[0] for t in range(20)])
    assert not held & set(trained.tolist())
    with pytest.raises(SakError, match="leaves nothing to train on.*give --holdout-shards 2 or less"):
        make_stream_plan(index, 3, holdout_shards=3)


# ---------------------------------------------------------------------------------------- reading


def test_batch_holds_the_recorded_view_and_its_stored_targets(cache):
    """Independently: cut the recorded crop from the tar's bytes, normalise; read targets with zarr."""
    index = open_cache(cache)
    reader = _reader(index)
    rows = np.array([5, 0, 7, 2], dtype=np.int64)  # unsorted, across two shards
    batch = reader.read(rows)
    views = pq.read_table(cache / "views.parquet").to_pylist()
    members = {}
    for tar_path in sorted((cache / "images").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[m.name.rsplit(".", 1)[0]] = tar.extractfile(m).read()
    mean = torch.tensor(input_normalization("student", "tiny")[0]).view(3, 1, 1)
    std = torch.tensor(input_normalization("student", "tiny")[1]).view(3, 1, 1)
    assert batch["images"].shape == (4, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    for i, row in enumerate(rows.tolist()):
        v = views[row]
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(members[v["key"]])).convert("RGB")).copy())
        view = cut_view(img.permute(2, 0, 1), (v["x0"], v["y0"], v["x1"], v["y1"]), v["flip"], (SIZE, SIZE))
        # the loader's one multiply-add differs from these two divisions by float32 rounding only
        torch.testing.assert_close(batch["images"][i], (view.float() / 255 - mean) / std, rtol=0, atol=2e-6)
    for store in index.stores:
        group = zarr.open_group(str(store.path), mode="r")
        for level, block in enumerate(store.blocks):
            got = batch["targets"][store.teacher][level]
            assert got.dtype == torch.float16  # the stored dtype: widened only in the loss
            want = np.asarray(group[f"levels/{block}"].get_orthogonal_selection((rows,)))
            assert np.array_equal(got.numpy(), want)


def test_online_views_at_each_teacher_side(cache):
    index = open_cache(cache)
    reader = _reader(index, with_targets=False, view_sides=(64, 256))
    batch = reader.read(np.array([3, 1]))
    assert "targets" not in batch
    assert batch["views"][64].shape == (2, 3, 64, 64) and batch["views"][256].shape == (2, 3, 256, 256)
    assert batch["views"][64].dtype == torch.uint8
    assert torch.allclose(reader.normalize(batch["views"][64]), batch["images"])


def test_normalization_modes():
    assert input_normalization("imagenet", "tiny") == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_normalization("student", "tiny") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(SakError, match="unknown normalization"):
        input_normalization("clip", "tiny")


# ------------------------------------------------------------------------------- workers and resume


def _rows(batches):
    return [b["rows"].tolist() for b in batches]


def test_workers_own_disjoint_shards_and_resume_is_exact(cache):
    index = open_cache(cache)
    plan = make_stream_plan(index, 3, seed=5, num_workers=2)
    assert plan.streams == 2
    loader = CacheLoader(plan, _reader(index), num_workers=2)
    it = iter(loader)
    full = [next(it) for _ in range(8)]
    it.close()
    assert [b["index"] for b in full] == list(range(8))
    # each worker (stream) reads only its own shards in an epoch
    for epoch in range(2):
        shards = {0: set(), 1: set()}
        for b in full:
            sel = b["epochs"] == epoch
            shards[b["stream"]] |= set((b["rows"][sel] // index.shard_size).tolist())
        assert shards[0] and shards[1] and not shards[0] & shards[1]

    first = CacheLoader(plan, _reader(index), num_workers=2)
    it = iter(first)
    head = [next(it) for _ in range(3)]  # stop after an odd number: mid-round of the two workers
    it.close()
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON, as in a checkpoint
    resumed = CacheLoader(plan, _reader(index), num_workers=2)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(5)]
    it.close()
    assert _rows(head + tail) == _rows(full)
    for a, b in zip(tail, full[3:]):
        assert torch.equal(a["images"], b["images"])
        for t in a["targets"]:
            assert all(torch.equal(x, y) for x, y in zip(a["targets"][t], b["targets"][t]))
    # a loader without workers walks the same order
    inline = CacheLoader(plan, _reader(index), num_workers=0)
    it = iter(inline)
    assert _rows([next(it) for _ in range(8)]) == _rows(full)
    it.close()
    other = CacheLoader(make_stream_plan(index, 3, seed=6, num_workers=2), _reader(index), num_workers=2)
    with pytest.raises(SakError, match="another data order"):
        other.load_state_dict(state)


def test_more_workers_than_cpus_are_capped_without_a_warning_or_another_order(cache, monkeypatch, recwarn):
    """--num-workers is per machine: on a 1-CPU node a run asking 4 uses 1 and walks the same order."""
    index = open_cache(cache)
    plan = make_stream_plan(index, 3, num_workers=2)
    wanted = _rows(list(itertools.islice(CacheLoader(plan, _reader(index), num_workers=0), 6)))
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    capped = CacheLoader(plan, _reader(index), num_workers=4)
    assert capped.num_workers == 1
    assert _rows(list(itertools.islice(capped, 6))) == wanted
    assert not [w for w in recwarn if "worker" in str(w.message)]


# ---------------------------------------------------------------------------------------- refusals


def _copy(cache, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(cache, dst)
    meta = json.loads((dst / "cache.json").read_text())
    stores = {e["teacher"]: dst / e["path"] / "manifest.json" for e in meta["stores"].values()}
    return dst, meta, stores


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("view_plan", {"seed": 1}, "disagree on the view plan"),
        ("dataset_fingerprint", "0123456789abcdef", "disagree on the dataset fingerprint"),
        ("views_sha256", "f" * 64, "views.parquet digest"),
        ("shard_size", 6, "disagree on the shard size"),
        ("num_views", 10, "disagree on the number of views"),
    ],
)
def test_stores_that_disagree_are_refused(cache, tmp_path, field, value, message):
    dst, _, stores = _copy(cache, tmp_path)
    manifest = json.loads(stores["clip_tiny"].read_text())
    new = {**manifest[field], **value} if isinstance(value, dict) else value
    _edit(stores["clip_tiny"], **{field: new})
    with pytest.raises(SakError, match=message) as e:
        open_cache(dst)
    assert "clip_tiny" in str(e.value)
    # alone, the odd store is still refused: it does not match cache.json
    with pytest.raises(SakError, match="belongs to another cache"):
        open_cache(dst, ["clip_tiny"])
    assert len(open_cache(dst, ["dinov2_tiny", "sam_tiny"]).stores) == 2


def test_incomplete_store_and_store_selection_are_checked(cache, tmp_path):
    dst, meta, stores = _copy(cache, tmp_path)
    _edit(stores["sam_tiny"], complete=False)
    with pytest.raises(SakError, match=r"sam_tiny .* is incomplete.*leave it out of --teachers"):
        open_cache(dst)
    assert [s.teacher for s in open_cache(dst, require_complete=False).stores] == list(TEACHERS)
    with pytest.raises(SakError, match="no store of teacher 'clip_b'"):
        open_cache(cache, ["clip_b"])
    # two stores of one teacher: pick by fingerprint
    fp, entry = next((fp, e) for fp, e in meta["stores"].items() if e["teacher"] == "clip_tiny")
    meta["stores"]["clip_tiny-000000000000"] = dict(entry)
    (dst / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(SakError, match="2 stores of clip_tiny.*fingerprint"):
        open_cache(dst, ["clip_tiny"])
    assert open_cache(cache, [fp]).stores[0].teacher == "clip_tiny"


def test_student_size_must_equal_the_view_size(cache):
    index = open_cache(cache)
    mean, std = input_normalization("student", "tiny")
    with pytest.raises(SakError, match="student takes 96px input but the cache's views are 64px"):
        BatchReader(index, 96, mean, std)


def test_a_hole_in_a_store_is_an_error_not_data(cache, tmp_path):
    dst, _, _ = _copy(cache, tmp_path)
    index = open_cache(dst)
    store = index.stores[0]
    arr = zarr.open_array(str(store.path / "levels" / str(store.blocks[0])), mode="r+")
    arr[4:8] = np.full((4, *arr.shape[1:]), np.nan, dtype=np.float16)  # what an unwritten shard reads as
    with pytest.raises(SakError, match="shard 1 .*levels/0/c/1/0/0/0 is missing"):
        _reader(index).read(np.array([5]))  # an all-fill shard file is not stored: the check names it
    manifest = json.loads((store.path / "manifest.json").read_text())
    for record in manifest["shards"]:  # a hole the manifest does not record: the shard reader sees it
        record["files"] = {rel: d for rel, d in record["files"].items() if (store.path / rel).is_file()}
        record.pop("xxh3", None)
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SakError, match="row 5 was never written"):
        _reader(open_cache(dst)).read(np.array([5]))


def test_a_non_finite_target_is_refused_where_it_is_decoded(cache):
    """The workers hand values over unscanned; decode_targets checks them on the training device."""
    index = open_cache(cache)
    batch = _reader(index).read(np.array([3, 1]))
    store = index.stores[-1]
    batch["targets"][store.teacher][0][1, 0, 0, 0] = float("inf")
    with pytest.raises(
        SakError, match=f"store {store.teacher} .* level {store.blocks[0]} row 1 is not finite"
    ):
        decode_targets(batch, index.stores, "cpu")
    batch["targets"][store.teacher][0][1, 0, 0, 0] = 0.0
    assert decode_targets(batch, index.stores, "cpu")[store.teacher][0].shape[0] == 2


def test_a_webdataset_store_reads_like_the_zarr_one(cache, tmp_path):
    """The same targets rewritten as a WebDataset store give the same batches."""
    wds = pytest.importorskip("sak.pipeline.store.wds")
    dst, meta, stores = _copy(cache, tmp_path)
    fp = next(fp for fp, e in meta["stores"].items() if e["teacher"] == "clip_tiny")
    index = open_cache(dst)
    info = next(s for s in index.stores if s.teacher == "clip_tiny")
    target = dst / "teachers" / f"{fp}-wds"
    target.mkdir()
    writer = wds.WdsTeacherStore(target, get_codec("fp16"), index.shard_size)
    files = {}
    for shard in range(index.num_shards):
        start, stop = shard * index.shard_size, min((shard + 1) * index.shard_size, index.num_views)
        levels = {}
        for block in info.blocks:
            arr = zarr.open_array(str(info.path / "levels" / str(block)), mode="r")
            levels[block] = torch.from_numpy(np.asarray(arr[start:stop])).float()
        files[shard] = writer.write_shard(shard, start, levels)
    manifest = json.loads((info.path / "manifest.json").read_text())
    shards = [{**r, "files": files[r["index"]]} for r in manifest["shards"]]
    manifest.pop("files")  # the Zarr store's files table does not describe the hand-made WebDataset store
    (target / "manifest.json").write_text(json.dumps({**manifest, "format": "wds", "shards": shards}))
    meta["stores"][fp] = {**meta["stores"][fp], "path": f"teachers/{fp}-wds", "format": "wds"}
    (dst / "cache.json").write_text(json.dumps(meta))
    rows = np.array([6, 1, 3, 0, 5], dtype=np.int64)
    a = _reader(open_cache(cache, ["clip_tiny"])).read(rows)["targets"]["clip_tiny"]
    b = _reader(open_cache(dst, ["clip_tiny"])).read(rows)["targets"]["clip_tiny"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
