"""Stage-2 target caches: teacher targets of the exact augmented images the stage-2 student sees.

A stage-2 view is the uint8 image `TrainSamples` gives for (seed, image, epoch): the replayable
`augment_plan` (scale, pad, crop, flip, photometric jitter) applied by `apply_plan`, the very functions the
trainer uses. `build_stage2_cache` replays the plans of epochs 0..E-1 for every training image and runs the
stage-1 run's teachers on them exactly as `--online` does (`Stage2Teachers`: the stage-1 stores' weights and
normalisation, SAM at its fixed side then zero-padded, the others at the crop size); `sak-train stage2
--cache` then reads the targets of row (epoch, image) instead of running teachers.

    OUT/cache.json               kind "sak-stage2-cache": dataset, data root, split, image-list hash, seed,
                                 crop, scale range, photometric, epochs, plan version, stage-1 run and its
                                 store fingerprints, per teacher: blocks, positions, grids, codec, shard files
    OUT/views.parquet            one row per (epoch, image), row = epoch * N + image index (the split file's
                                 order): row, epoch, image, name, height, width (the source image), scale,
                                 flip, crop_y, crop_x, brightness, contrast, saturation, hue (null = step
                                 skipped), contrast_first, valid_h, valid_w (unpadded part of the crop),
                                 image_sha256 (of the augmented uint8 image, (3, H, W) C order)
    OUT/teachers/<teacher>/      a Zarr teacher store (store/zarr.py): levels/<block> (rows, h, w, C) in the
                                 stage-2 grid, shards.jsonl journal (resume skips finished shards)

The trainer refuses (one line naming both values) a cache whose dataset, split, images, seed, crop,
augmentation, plan version or teachers differ from the run's, or that holds fewer epochs than the run
needs, and checks every batch image against the recorded sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import CacheLock
from sak.pipeline.base.provenance import code_version, now_iso, sha256_file, stable_hash
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.lock import BucketLock
from sak.pipeline.buckets.mirror import fresh_mirror, metadata_mirror, pull, push, push_metadata
from sak.pipeline.format.documents import read_stage2_cache, write_stage2_cache
from sak.pipeline.format.journal import append_journal, read_journal
from sak.pipeline.format.layout import JOURNAL
from sak.pipeline.format.records import ShardRecord, Stage2Cache, Stage2Identity, Stage2Teacher
from sak.pipeline.store.codecs import get_codec
from sak.pipeline.store.zarr import ZarrTeacherStore, create_store
from sak.pipeline.teachers.weights import weights_field
from sak.student.data.dense import (
    DATASETS,
    DEFAULT_INPUT_SIZE,
    DenseDataset,
    TrainSamples,
    apply_plan,
    parse_img_size,
    read_image,
)
from sak.student.train.distributed import resolve_device
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run, named_teachers

log = logging.getLogger("sak")

KIND = "sak-stage2-cache"
CACHE_JSON = "cache.json"
VIEWS = "views.parquet"
PLAN_VERSION = 1  # bump when augment_plan / apply_plan change what a (seed, image, epoch) view is
SPLIT = "train"


@dataclass(frozen=True)
class Stage2CacheConfig:
    """dataset, data_root: as for `sak-train stage2`; init: the stage-1 run (its teachers); out: the cache.

    epochs: plans of epochs 0..epochs-1 are cached (a run of S steps of B needs ceil(S * B / N) epochs).
    img_size: the crop (H, W), None = the dataset's default. scale_range, photometric, seed: the run's.
    codec: target codec (fp16, bf16, fp32, ...). shard_size: rows per shard file. batch_size: images per
    teacher forward. device: cpu | cuda | None (cuda when available).
    """

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
    init: str | None = field(
        default=None,
        metadata={
            "help": "The stage-1 run (its teachers' stores); or name them with --teachers.",
            "metavar": "RUN",
        },
    )
    out: str = field(
        default="",
        metadata={
            "help": "Cache folder or s3:// / gs:// URL (created; an unfinished one resumes).",
            "required": True,
        },
    )
    epochs: int = field(default=1, metadata={"help": "Epochs of plans to cache (0..E-1)."})
    teachers: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Teachers by name (dinov2_l,clip_l,sam_l) instead of a stage-1 --init run."},
    )
    weights: tuple[tuple[str, str], ...] = weights_field(
        "Local .safetensors/.pth weights of a named teacher (repeatable); default: timm hub weights."
    )
    random_init: bool = field(
        default=False, metadata={"help": "Named teachers with random weights (tests; flagged in cache.json)."}
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "HxW crop, as `sak-train stage2` [default: 512x512, NYUD 448x576].",
            "parse": parse_img_size,
        },
    )
    scale_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"cli": False})
    photometric: bool = field(default=True, metadata={"cli": False})
    seed: int = field(
        default=0, metadata={"help": "The stage-2 run's --seed (and the named teachers' random init)."}
    )
    codec: str = field(default="fp16", metadata={"help": "Target codec (fp16, bf16, fp32, ...)."})
    shard_size: int = field(default=64, metadata={"help": "Rows per shard file."})
    batch_size: int = field(default=8, metadata={"help": "Images per teacher forward."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda [default: cuda when available]."})
    workers: int = field(
        default=0,
        metadata={"help": "Ray actors computing shards (0: in this process); each loads the teachers."},
    )
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: embedded)."})

    def crop(self) -> tuple[int, int]:
        return tuple(self.img_size) if self.img_size else DEFAULT_INPUT_SIZE[self.dataset]


def names_hash(names: list[str]) -> str:
    return stable_hash(list(names))


def image_sha256(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def augmented_image(samples: TrainSamples, epoch: int, index: int) -> tuple[torch.Tensor, dict]:
    """The uint8 image TrainSamples gives for (epoch, image index), without reading labels; + its plan row."""
    data = samples.data
    name = data.names[index]
    image = read_image(data.image_path(name))
    h, w = image.shape[-2:]
    plan = samples.plan(name, epoch, h, w)
    out = apply_plan({"name": name, "image": image, "labels": {}}, plan, samples.crop)
    row = {
        "row": epoch * len(data) + index,
        "epoch": epoch,
        "image": index,
        "name": name,
        "height": int(h),
        "width": int(w),
        **{k: getattr(plan, k) for k in plan.__dataclass_fields__},
        "valid_h": int(out["size"][0]),
        "valid_w": int(out["size"][1]),
        "image_sha256": image_sha256(out["image"]),
    }
    return out["image"], row


def _identity(cfg: Stage2CacheConfig, data: DenseDataset, fingerprints: list[str]) -> Stage2Identity:
    return Stage2Identity(
        dataset=cfg.dataset,
        split=SPLIT,
        num_images=len(data),
        names_sha=names_hash(data.names),
        seed=int(cfg.seed),
        crop=list(cfg.crop()),
        scale_range=[float(x) for x in cfg.scale_range],
        photometric=bool(cfg.photometric),
        plan_version=PLAN_VERSION,
        fingerprints=list(fingerprints),
    )


def cache_teachers(cfg: Stage2CacheConfig, crop: tuple[int, int], device: torch.device) -> Stage2Teachers:
    """The teachers a stage-2 cache runs: the stage-1 run's (--init) or named ones (--teachers)."""
    if bool(cfg.init) == bool(cfg.teachers):
        raise SakError("give one of --init RUN (a stage-1 run's teachers) and --teachers NAMES")
    if cfg.init:
        _, stage1 = load_stage1_run(cfg.init, device)
        return Stage2Teachers(stage1, crop, device)
    return Stage2Teachers.named(cfg.teachers, dict(cfg.weights), cfg.random_init, cfg.seed, crop, device)


def _done(path: Path, shard: int) -> bool:
    return (path / JOURNAL).exists() and shard in read_journal(path)


def build_stage2_cache(cfg: Stage2CacheConfig) -> Path:
    """Replay the stage-2 plans of every (epoch, image) and store the teachers' targets for them."""
    if cfg.epochs < 1 or cfg.shard_size < 1 or cfg.batch_size < 1:
        raise SakError("--epochs, --shard-size and --batch-size must be >= 1")
    crop = cfg.crop()
    if crop[0] % 16 or crop[1] % 16 or min(crop) < 32:
        raise SakError(f"--img-size {crop[0]}x{crop[1]}: both sides must be multiples of 16 and >= 32")
    codec = get_codec(cfg.codec)
    if codec.low_rank:
        raise SakError(
            f"--codec {cfg.codec}: a stage-2 target cache does not take pca<k> (its targets change every epoch, "
            f"no first shard fits them all); use fp16, bf16, fp32 or a quantised codec"
        )
    remote = Bucket(cfg.out) if is_url(cfg.out) else None  # written as `run` writes a bucket (buckets/)
    out = fresh_mirror(cfg.out) if remote else Path(cfg.out).expanduser()
    device = resolve_device(cfg.device)
    data = DenseDataset(cfg.dataset, cfg.data_root, SPLIT)
    teachers = None if cfg.workers > 0 else cache_teachers(cfg, crop, device)  # Ray: in the actors
    infos = teachers.stores if teachers is not None else store_infos(cfg)
    identity = _identity(cfg, data, [s.fingerprint for s in infos])
    out.mkdir(parents=True, exist_ok=True)
    with BucketLock(remote) if remote else CacheLock(out):
        if remote:  # the driver works on a mirror of the bucket's metadata; the bucket is the truth
            pull(remote, out, bulk=False)
        return _build(cfg, out, data, teachers, infos, identity, codec, remote)


def store_infos(cfg: Stage2CacheConfig) -> list:
    """What the cache records of each teacher (name, fingerprint, blocks, positions), without its model."""
    if bool(cfg.init) == bool(cfg.teachers):
        raise SakError("give one of --init RUN (a stage-1 run's teachers) and --teachers NAMES")
    if cfg.teachers:
        return [s for s, _, _ in named_teachers(cfg.teachers, dict(cfg.weights), cfg.random_init, cfg.seed)]
    from sak.pipeline.base.provenance import read_json
    from sak.student.data.loader import open_cache

    stage1 = read_json(Path(cfg.init).expanduser() / "config.json")
    fps = [s["fingerprint"] for s in stage1["cache"]["stores"]]
    return open_cache(stage1["cache"]["path"], fps, require_complete=False).stores


class _ShardWriter:
    """The driver's side: one writer per shard file, then the shard journaled (resume skips it). A bucket
    cache: each shard file is uploaded whole and checked before the shard is journaled (and the journal
    uploaded), as `run` does."""

    def __init__(
        self, paths: dict, n_rows: int, shard_size: int, codec, codec_name: str, remote: Bucket | None
    ) -> None:
        self.paths, self.n_rows, self.shard_size, self.codec, self.codec_name = (
            paths, n_rows, shard_size, codec, codec_name,
        )  # fmt: skip
        self.remote = remote
        self.stores: dict[str, ZarrTeacherStore] = {}

    def write(self, shard: int, start: int, stop: int, infos: list, maps: dict, seconds: float) -> None:
        for info in infos:
            levels = [torch.from_numpy(np.array(m)) for m in maps[info.teacher]]  # writable copy
            path = self.paths[info.teacher]
            if info.teacher not in self.stores:
                grids = {b: tuple(m.shape[1:]) for b, m in zip(info.blocks, levels)}
                create_store(path, self.n_rows, self.shard_size, grids, self.codec)  # idempotent
                self.stores[info.teacher] = ZarrTeacherStore(path, self.codec, self.shard_size)
                if self.remote:  # the Zarr metadata, so that the store opens from the bucket
                    push_metadata(self.remote.sub(f"teachers/{info.teacher}"), path)
            files = self.stores[info.teacher].write_shard(shard, start, dict(zip(info.blocks, levels)))
            if self.remote:  # uploaded and checked before the journal says the shard is done
                push(self.remote.sub(f"teachers/{info.teacher}"), path, list(files))
            append_journal(
                path, ShardRecord(shard=shard, start=start, stop=stop, files=files, seconds=seconds)
            )
            if self.remote:
                self.remote.put_whole(path / JOURNAL, f"teachers/{info.teacher}/{JOURNAL}")


class _ShardWorker:
    """Augmented images of a shard's rows -> every teacher's maps (numpy, fp32). In process or a Ray actor."""

    def __init__(
        self, cfg: Stage2CacheConfig, teachers: Stage2Teachers | None = None, threads: int | None = None
    ) -> None:
        if threads:  # a CPU Ray actor: its share of the node's cores
            torch.set_num_threads(threads)
        crop = cfg.crop()
        self.cfg = cfg
        self.data = DenseDataset(cfg.dataset, cfg.data_root, SPLIT)
        self.samples = TrainSamples(self.data, crop, cfg.seed, cfg.scale_range, cfg.photometric)
        self.teachers = teachers or cache_teachers(cfg, crop, resolve_device(cfg.device))

    def run(self, shard: int, start: int, stop: int) -> tuple[int, list[dict], dict, float]:
        t0 = time.perf_counter()
        built = [augmented_image(self.samples, *divmod(r, len(self.data))) for r in range(start, stop)]
        images = torch.stack([b[0] for b in built])
        maps: dict[str, list[list[torch.Tensor]]] = {}
        for i in range(0, len(images), self.cfg.batch_size):
            for teacher, levels in self.teachers(images[i : i + self.cfg.batch_size]).items():
                maps.setdefault(teacher, []).append([m.cpu() for m in levels])
        joined = {t: [torch.cat(p).numpy() for p in zip(*parts)] for t, parts in maps.items()}
        return shard, [b[1] for b in built], joined, time.perf_counter() - t0


def _ray_shards(cfg: Stage2CacheConfig, todo: list[int], bounds: dict, out: Path):
    """Shards computed by `cfg.workers` Ray actors (teachers loaded once each), placed, restarted and fed
    as `sak-cache run`'s (pipeline/extraction/actors.py); yields results as they land (the driver writes and
    journals each); a failure ends the build after the shards in flight, finished shards kept."""
    from sak.pipeline.extraction.actors import (
        ActorPool,
        actor_placement,
        shard_failure_error,
        start_actors,
        stop_actors,
    )
    from sak.pipeline.extraction.runtime import ray_session

    with ray_session(cfg.address, None, 512):
        placement = actor_placement(
            cfg.workers, len(todo), use_gpus=resolve_device(cfg.device).type == "cuda"
        )
        placement = dataclasses.replace(placement, concurrency=1)  # one shard at a time per actor
        workers = start_actors(_ShardWorker, placement, cfg, None, placement.threads)
        done = 0
        try:
            for _, result in ActorPool(workers).run(todo, lambda w, s: w.run.remote(s, *bounds[s])):
                done += 1
                yield result
        except Exception as e:
            raise shard_failure_error(e, out, done, "stage-2 cache build") from e
        finally:
            stop_actors(workers)


def _build(
    cfg: Stage2CacheConfig,
    out: Path,
    data: DenseDataset,
    teachers: Stage2Teachers | None,
    infos: list,
    identity: Stage2Identity,
    codec,
    remote: Bucket | None = None,
) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    crop = cfg.crop()
    shown = remote.url if remote else out
    if (out / CACHE_JSON).exists():
        old = read_stage2_cache(out / CACHE_JSON)
        for k in Stage2Identity.__dataclass_fields__:
            if getattr(old.identity, k) != getattr(identity, k):
                raise SakError(
                    f"{shown} was built with {k} {getattr(old.identity, k)!r}, not {getattr(identity, k)!r}: "
                    f"choose another --out"
                )
        if old.epochs != cfg.epochs or old.codec != cfg.codec or old.shard_size != cfg.shard_size:
            raise SakError(
                f"{shown} was built with other --epochs/--codec/--shard-size: choose another --out"
            )
    elif any(p.name != ".sak-lock" for p in out.iterdir()):
        raise SakError(f"--out {shown} exists and is not a stage-2 cache; choose an empty folder or prefix")

    samples = TrainSamples(data, crop, cfg.seed, cfg.scale_range, cfg.photometric)
    n_rows = cfg.epochs * len(data)
    n_shards = math.ceil(n_rows / cfg.shard_size)
    record = Stage2Cache(
        identity=identity,
        data_root=str(Path(cfg.data_root).expanduser().resolve()),
        init=str(Path(cfg.init).expanduser().resolve()) if cfg.init else None,
        epochs=cfg.epochs,
        rows=n_rows,
        codec=cfg.codec,
        shard_size=cfg.shard_size,
        num_shards=n_shards,
        views=VIEWS,
        complete=False,
        code_version=code_version(),
        created=now_iso(),
    )
    write_stage2_cache(out / CACHE_JSON, record)
    if remote:  # `inspect` shows a cache in progress
        remote.put_whole(out / CACHE_JSON, CACHE_JSON)

    paths = {info.teacher: out / "teachers" / info.teacher for info in infos}
    writer = _ShardWriter(paths, n_rows, cfg.shard_size, codec, cfg.codec, remote)
    t0 = time.perf_counter()
    todo = [s for s in range(n_shards) if not all(_done(paths[i.teacher], s) for i in infos)]
    bounds = {s: (s * cfg.shard_size, min((s + 1) * cfg.shard_size, n_rows)) for s in range(n_shards)}
    rows_of: dict[int, list[dict]] = {}
    for shard in sorted(set(range(n_shards)) - set(todo)):  # resumed: on disk already, only its rows
        rows_of[shard] = [augmented_image(samples, *divmod(r, len(data)))[1] for r in range(*bounds[shard])]
    if cfg.workers > 0:
        results = _ray_shards(cfg, todo, bounds, out)
    else:
        worker = _ShardWorker(cfg, teachers)
        results = (worker.run(s, *bounds[s]) for s in todo)
    for shard, rows, maps, seconds in results:
        rows_of[shard] = rows
        writer.write(
            shard, *bounds[shard], [i for i in infos if not _done(paths[i.teacher], shard)], maps, seconds
        )
        log.info(f"stage-2 cache: shard {shard} done ({len(rows_of)}/{n_shards} shards)")
    rows = [r for s in sorted(rows_of) for r in rows_of[s]]

    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / VIEWS)
    done = []
    for info in infos:
        store = ZarrTeacherStore(paths[info.teacher], codec, cfg.shard_size)
        journal = read_journal(store.path)
        done.append(
            Stage2Teacher(
                teacher=info.teacher,
                stage1_fingerprint=info.fingerprint,
                weights=getattr(info, "weights", None),
                seed=getattr(info, "seed", None),
                path=f"teachers/{info.teacher}",
                blocks=list(info.blocks),
                positions=list(info.positions),
                grids=[list(store.array(b).shape[1:]) for b in info.blocks],
                shards={str(s): journal[s].files for s in sorted(journal)},
            )
        )
    record = dataclasses.replace(
        record,
        teachers=done,
        views_sha256=sha256_file(out / VIEWS),
        complete=True,
        seconds=round(time.perf_counter() - t0, 3),
        finished=now_iso(),
    )
    if remote:  # views and metadata first, cache.json (complete) last
        push_metadata(remote, out)
    write_stage2_cache(out / CACHE_JSON, record)
    if remote:
        remote.put_whole(out / CACHE_JSON, CACHE_JSON)
    log.info(f"stage-2 cache {shown}: {n_rows} rows ({cfg.epochs} epochs x {len(data)} images)")
    return out


def describe(cache: Stage2Cache) -> str:
    i = cache.identity
    teachers = ", ".join(t.teacher for t in cache.teachers or [])
    return (
        f"stage-2 cache: {i.dataset} {i.split} ({i.num_images} images) x {cache.epochs} epochs = "
        f"{cache.rows} rows, crop {i.crop[0]}x{i.crop[1]}, seed {i.seed}, {cache.codec}; "
        f"teachers {teachers}"
    )


class Stage2CachedTargets:
    """Targets of the batch's (epoch, image) rows from a stage-2 cache, in Stage2Teachers' output form.

    `stores` carries each teacher's name and tap positions (what `student_levels` needs).
    """

    def __init__(self, path: str | Path, expected: dict, steps: int, batch_size: int) -> None:
        import pyarrow.parquet as pq

        url = str(path).rstrip("/") if is_url(path) else None  # read in place: zarr reads chunks by range
        self.root = metadata_mirror(url) if url else Path(path).expanduser()
        self.shown = url or self.root
        if not (self.root / CACHE_JSON).exists():
            raise SakError(f"--cache {self.shown} is not a stage-2 cache (no {CACHE_JSON})")
        try:
            cache = read_stage2_cache(self.root / CACHE_JSON)
        except SakError as e:
            raise SakError(f"--cache {self.shown}: {e}") from None
        if not cache.complete or cache.teachers is None:
            raise SakError(f"--cache {self.shown} is incomplete; re-run `sak-cache stage2` to finish it")
        for key, want in expected.items():
            have = getattr(cache.identity, key, None)
            if have != want:
                raise SakError(f"--cache {self.shown} was built with {key} {have!r}, this run has {want!r}")
        needed = steps * batch_size
        if needed > cache.rows:
            raise SakError(
                f"--cache {self.shown} holds {cache.epochs} epochs ({cache.rows} samples), this run needs "
                f"{needed} ({math.ceil(needed / cache.identity.num_images)} epochs)"
            )
        self.cache = cache
        self.stores = [
            SimpleNamespace(teacher=t.teacher, positions=tuple(t.positions)) for t in cache.teachers
        ]
        self._readers = {
            t.teacher: (
                ZarrTeacherStore(
                    f"{url}/{t.path}" if url else self.root / t.path, get_codec(cache.codec), cache.shard_size
                ),
                t.blocks,
            )
            for t in cache.teachers
        }
        try:
            self.sha = pq.read_table(self.root / VIEWS, columns=["image_sha256"]).column(0).to_pylist()
        except (OSError, ValueError) as e:
            raise SakError(
                f"--cache {self.shown}: {VIEWS} cannot be read ({type(e).__name__}); the file is damaged"
            ) from e

    def __call__(
        self, batch: dict, images_u8: torch.Tensor, device: torch.device
    ) -> dict[str, list[torch.Tensor]]:
        rows = np.asarray(batch["rows"], dtype=np.int64)
        for r, im in zip(rows, images_u8):
            if image_sha256(im.cpu()) != self.sha[r]:
                raise SakError(
                    f"--cache {self.shown}: the augmented image of row {r} differs from the cached one "
                    f"(augmentation code changed?); rebuild the cache"
                )
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        out = {}
        for teacher, (store, blocks) in self._readers.items():
            out[teacher] = [store.read_rows(b, rows[order])[inverse].to(device) for b in blocks]
        return out
