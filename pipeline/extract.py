"""`sak-cache run`: the Ray job that fills a cache with multi-level teacher features.

    driver: ingest once (images/, views.parquet, cache.json), create each teacher store, plan shard jobs
    CPU tasks: read stored image bytes, decode each image once, cut its views at every teacher input size
    one TeacherWorker actor per GPU (per CPU slot without GPUs): all selected teachers loaded once; runs each
      batch through each teacher under inference mode (bf16 autocast on CUDA) and writes whole shard files
    driver: journals each finished shard (checksums), so a re-run skips done shards and redoes the rest

Memory stays bounded: at most `max_in_flight` shards exist between decode and write at any time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from sak.pipeline.actors import (
    LiveActors,
    actor_placement,
    lost_actor,
    shard_failure_error,
    start_actors,
    stop_actors,
)
from sak.pipeline.codecs import get_codec, refuse_overflow
from sak.pipeline.errors import SakError
from sak.pipeline.fidelity import is_lossy, measure_levels
from sak.pipeline.format import (
    CacheManifest,
    CodecSpec,
    ExtractRecord,
    Preprocessing,
    ShardEntry,
    StoreEntry,
    StoreIdentity,
    StoreManifest,
    TeacherRecord,
    Throughput,
    WeightsRecord,
    load,
    write_store_manifest,
)
from sak.pipeline.ingest import ingest
from sak.pipeline.lock import CacheLock
from sak.pipeline.lowrank import discard_bases, has_basis, prepare_bases, read_bases
from sak.pipeline.manifest import (
    IMAGE_INDEX_FILE,
    JOURNAL,
    STORE_MANIFEST,
    VIEWS_FILE,
    ShardRecord,
    append_journal,
    merge_stats,
    now_iso,
    read_cache,
    read_journal,
    read_store_manifest,
    save_stats,
    shard_stats,
    store_files_table,
    store_fingerprint,
    write_cache,
)
from sak.pipeline.preprocess import ViewRow, cut_shard_views
from sak.pipeline.provenance import SCHEMA_VERSION, code_version, sha256_file, xxh3_file
from sak.pipeline.runtime import Progress, log, ray_session
from sak.pipeline.storage import (
    Bucket,
    BucketLock,
    fresh_mirror,
    is_url,
    node_mirror,
    pull,
    push,
    push_metadata,
)
from sak.pipeline.store import check_format, create_teacher_store, level_records, open_teacher_store
from sak.pipeline.student_views import add_student_views
from sak.pipeline.student_views import check_mode as check_views_mode
from sak.pipeline.targets import (
    codec_field,
    compressor_field,
    format_field,
    grid_field,
    identity_fields,
    levels_field,
    resolve_grid,
    select_levels,
    shape_targets,
    student_views_field,
)
from sak.pipeline.teachers import (
    TOKEN_SELECTION,
    TeacherSpec,
    WeightsChoice,
    load_teacher,
    normalization_for,
    parse_teachers,
    resolve_weights,
)
from sak.pipeline.views import ViewPlan

DEFAULT_SHARD_VIEWS = 64


def parse_weights(text: str) -> tuple[str, str]:
    """`--weights NAME=PATH` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SakError(
            f"--weights {text!r} must look like NAME=PATH, e.g. dinov2_l=/ckpt/dinov2_l.safetensors"
        )
    return name.strip(), path.strip()


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `sak-cache run` needs; recorded in every manifest it writes."""

    source: str | None = field(
        metadata={
            "help": "Image folder (recursive; jpg/jpeg/png/webp), WebDataset .tar shards (a file, folder or "
            "brace pattern), or .parquet with an image-bytes column. Optional when --out already holds a "
            "cache (its stored images are reused).",
            "required": False,
        }
    )
    out: str = field(
        metadata={
            "help": "Cache folder, or s3:// / gs:// URL (credentials from the standard environment). Created "
            "if missing; an existing cache gains a store per new teacher and resumes unfinished ones."
        }
    )
    teachers: tuple[str, ...] = field(
        metadata={
            "help": "Comma list of teachers: dinov2_b, dinov2_l, clip_b, clip_l, sam_b, sam_l, or the tiny "
            "random-init dinov2_tiny, clip_tiny, sam_tiny."
        }
    )
    views_per_image: int = field(
        default=2,
        metadata={
            "help": "K deterministic random-resized-crop+flip views per image; epoch e replays view e mod K "
            "[an existing cache: its own].",
            "group": "views",
        },
    )
    size: int = field(
        default=384,
        metadata={
            "help": "View side in pixels (SAM sees 1024) [an existing cache: its own].",
            "group": "views",
        },
    )
    shard_size: int | None = field(
        default=None,
        metadata={
            "help": "Views per shard file (a multiple of K) [default: 64 rounded up; an existing cache: its own].",
            "group": "views",
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Views per teacher forward.", "group": "compute"})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N images (sorted by key)."})
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster address (e.g. ray://head:10001 or auto); default: embedded local Ray.",
            "group": "compute",
        },
    )
    weights: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={
            "help": "Local .safetensors/.pth weights for a teacher (repeatable); default: timm hub weights.",
            "multiple": True,
            "parse": parse_weights,
            "metavar": "NAME=PATH",
            "group": "teachers",
        },
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Random weights for teachers without --weights. For tests: the cache is flagged as "
            "random-init everywhere.",
            "group": "teachers",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the view plan and random init [an existing cache: its own].",
            "group": "views",
        },
    )
    normalization: str = field(
        default="teacher",
        metadata={
            "help": "teacher: each model's own mean/std; imagenet: ImageNet's for all (the paper's code).",
            "choices": ("teacher", "imagenet"),
            "group": "teachers",
        },
    )
    codec: str = codec_field()
    format: str = format_field()
    student_views: str = student_views_field()
    compressor: str = compressor_field()
    levels: str = levels_field()
    grid: str = grid_field()  # canonical: "native" | "student" | "HxW" (parse_grid at the config boundary)
    workers: int | None = field(
        default=None,
        metadata={"help": "Teacher actors [default: one per GPU, or half the CPUs].", "group": "compute"},
    )
    object_store_mb: int = field(
        default=1024, metadata={"help": "Embedded Ray object store size.", "group": "compute"}
    )
    min_image_side: int = field(
        default=32, metadata={"help": "Skip images whose shorter side is smaller (recorded in the manifest)."}
    )
    max_pixels: int = field(
        default=178_956_970, metadata={"help": "Skip images with more pixels (decompression-bomb guard)."}
    )
    progress: bool = field(default=True, metadata={"help": "Progress bar and progress log lines."})

    def resolved_shard_size(self) -> int:
        k = self.views_per_image
        if self.shard_size is None:
            return k * -(-DEFAULT_SHARD_VIEWS // k)
        if self.shard_size < 1 or self.shard_size % k:
            raise SakError(
                f"--shard-size {self.shard_size} must be a positive multiple of --views-per-image {k} "
                f"(an image's views stay in one shard); try {k * max(1, round(self.shard_size / k))}"
            )
        return self.shard_size


# ------------------------------------------------------------------------- messages across the Ray boundary


@dataclass(frozen=True)
class StoreJob:
    """One store as a TeacherWorker needs it: which teacher, its weights, where and how to write."""

    teacher: str
    weights: WeightsChoice
    path: str
    codec: str
    shard_size: int
    format: str
    blocks: tuple[int, ...]  # kept levels
    grid: tuple[int, int]  # stored (H, W)
    cache_url: str | None = None  # a URL cache: the worker writes in its node's mirror, then uploads
    fidelity_shard: int = 0  # the shard whose stored targets are compared with fp32 (pca<k>: a held-out one)


@dataclass(frozen=True)
class ShardJob:
    """One shard to compute: rows [start, stop) for the listed teachers (those that have not done it)."""

    shard: int
    start: int
    stop: int
    teachers: tuple[str, ...]

    @property
    def views(self) -> int:
        return self.stop - self.start


@dataclass
class StorePlan:
    spec: TeacherSpec
    weights: WeightsChoice
    fingerprint: str
    path: Path
    manifest: StoreManifest  # as it will be written (shards, stats, files filled in at the end)
    blocks: tuple[int, ...]  # kept levels
    grid: tuple[int, int]  # stored (H, W)
    done: dict[int, ShardRecord] = field(default_factory=dict)
    cache_url: str | None = None  # the bucket the store lives in (path is then the driver's mirror)

    @property
    def rel(self) -> str:
        return f"teachers/{self.fingerprint}"

    def job(self) -> StoreJob:
        m = self.manifest
        return StoreJob(
            self.spec.name,
            self.weights,
            str(self.path),
            m.codec,
            m.shard_size,
            m.format,
            self.blocks,
            self.grid,
            self.cache_url,
            # pca<k>: the basis is fitted on shard 0, so its fidelity is measured on shard 1 (held out)
            1 if get_codec(m.codec).low_rank and m.num_views > m.shard_size else 0,
        )


# ------------------------------------------------------------------------------------------------ driver


def run_extraction(cfg: ExtractConfig) -> Path:
    """Run (or resume) an extraction; returns the cache folder."""
    specs, out, plan, shard_size, choices = _setup(cfg)
    remote = Bucket(cfg.out) if is_url(cfg.out) else None
    with (
        BucketLock(remote) if remote else CacheLock(out),
        ray_session(cfg.address, None, cfg.object_store_mb),
    ):
        if remote:  # the driver works on a mirror of the bucket's metadata; the bucket is the truth
            pull(remote, out, bulk=False)
        elif cfg.address:
            _probe_nodes(out)
        cache = _open_or_ingest(cfg, out, plan, shard_size)
        if cfg.student_views == "raw":
            cache = add_student_views(out, cache, view_rows(out), cfg.out if remote else None)
        stores = [_store_plan(cfg, cache, out, s, choices[s.name]) for s in specs]
        cache = _register_stores(out, cache, stores, finished=False)  # `inspect` shows a run in progress
        schedule = Schedule.of(_shard_jobs(cache, stores))
        schedule.hold_first = _needs_basis(stores)  # pca<k>: shard 0 fits the basis before any other shard
        t0 = time.monotonic()
        try:
            _run_shards(cfg, out, stores, schedule)
        finally:
            for sp in stores:
                _finalize(sp, cache, time.monotonic() - t0, schedule)
            _register_stores(out, cache, stores, finished=True)
    for sp in stores:
        if sp.manifest.random_init:
            log.warning(
                f"store {sp.fingerprint} holds RANDOM-INIT {sp.spec.name} features: not a real teacher"
            )
    return out


RECORDED_IN_CACHE = ("views_per_image", "size", "seed", "shard_size")  # what every store must agree on


def with_recorded_defaults(cfg: ExtractConfig, given: Iterable[str]) -> ExtractConfig:
    """A recorded value is a default too: when `cfg.out` already holds a cache, the view plan (K, size,
    seed) and shard size not in `given` (the fields the user set) are the cache's own, so
    `run --out CACHE --teachers sam_l` adds a store without restating them. A given value that disagrees
    with the recorded one is refused, naming both."""
    out = Path(cfg.out).expanduser()
    if not (out / "cache.json").exists():
        return cfg
    cache = read_cache(out)
    plan = cache.view_plan
    recorded = dict(
        views_per_image=plan.views_per_image, size=plan.size, seed=plan.seed, shard_size=cache.shard_size
    )
    given = set(given)
    for name in RECORDED_IN_CACHE:
        mine = getattr(cfg, name)
        if name in given and mine != recorded[name]:
            option = "--" + name.replace("_", "-")
            raise SakError(
                f"{out} was created with {option} {recorded[name]}, this run asks for {mine}; "
                f"leave {option} out (or give {recorded[name]}) to add a store, or use another --out"
            )
    return dataclasses.replace(cfg, **{k: v for k, v in recorded.items() if k not in given})


def _setup(cfg: ExtractConfig):
    """Check every option before any work: (teacher specs, out folder, view plan, shard size, weights)."""
    specs = parse_teachers(list(cfg.teachers))
    get_codec(cfg.codec)  # a bad --codec fails before any work
    out = Path(cfg.out).expanduser().resolve() if not is_url(cfg.out) else fresh_mirror(cfg.out)
    if cfg.source is not None and not Path(cfg.source.split("{")[0].split("*")[0]).exists():
        raise SakError(
            f"source {cfg.source} does not exist; pass --source with an image folder, .tar shards "
            f"or .parquet files"
        )
    if cfg.batch_size < 1:
        raise SakError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_format(cfg.format)
    check_views_mode(cfg.student_views)
    for spec in specs:  # a bad --levels or --grid fails before any work
        select_levels(spec, cfg.levels)
        resolve_grid(spec, cfg.size, cfg.grid)
    plan = ViewPlan(seed=cfg.seed, views_per_image=cfg.views_per_image, size=cfg.size)
    shard_size = cfg.resolved_shard_size()
    choices = resolve_weights(specs, dict(cfg.weights), cfg.random_init, cfg.seed)
    _check_out_dir(out)
    return specs, out, plan, shard_size, choices


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


def _probe_nodes(out: Path) -> None:
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


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SakError(f"cannot write to output folder {out}: {e.strerror}; pass a writable --out") from e


def _open_or_ingest(cfg: ExtractConfig, out: Path, plan: ViewPlan, shard_size: int) -> CacheManifest:
    if (out / "cache.json").exists():
        cache = read_cache(out)
        for name, mine, theirs in (
            ("--views-per-image", plan.views_per_image, cache.view_plan.views_per_image),
            ("--size", plan.size, cache.view_plan.size),
            ("--seed", plan.seed, cache.view_plan.seed),
        ):
            if mine != theirs:
                raise SakError(
                    f"{out} was created with {name} {theirs}, this run asks for {mine}; "
                    f"use the same value to add a store, or another --out for a new cache"
                )
        if cfg.shard_size is not None and shard_size != cache.shard_size:
            raise SakError(f"{out} has --shard-size {cache.shard_size}, this run asks for {shard_size}")
        log.info(f"reusing images and views of {out} ({cache.num_views} views)")
        return cache
    if not cfg.source:
        raise SakError(f"{out} holds no cache yet; pass --source with the images to extract")
    return ingest(
        cfg.source,
        out,
        plan,
        shard_size,
        limit=cfg.limit,
        min_side=cfg.min_image_side,
        max_pixels=cfg.max_pixels,
        progress=cfg.progress,
        url=cfg.out if is_url(cfg.out) else None,
    )


def _store_identity(
    cfg: ExtractConfig, cache: CacheManifest, spec: TeacherSpec, weights: WeightsRecord
) -> StoreIdentity:
    """What determines a store's bytes; the hash of its JSON is the fingerprint."""
    codec = get_codec(cfg.codec)
    mean, std = normalization_for(spec, cfg.normalization)
    side = spec.model_input_side(cfg.size)
    shape = identity_fields(spec, cfg.size, cfg.levels, cfg.grid)  # levels, grid (+ mode, resample)
    return StoreIdentity(
        schema_version=SCHEMA_VERSION,
        teacher=spec.name,
        timm_name=spec.timm_name,
        pretrained_tag=spec.pretrained_tag,
        model_kwargs=dict(spec.model_kwargs),
        weights=weights.id,
        input_size=[side, side],
        view_size=cfg.size,
        preprocessing=Preprocessing(
            resize="cut_view: bicubic+antialias, float32, rounded to uint8",
            normalization=cfg.normalization,
            mean=list(mean),
            std=list(std),
            pad="zeros right/bottom after normalisation" if spec.fixed_input else None,
        ),
        levels=shape["levels"],
        token_selection=TOKEN_SELECTION,
        grid=shape["grid"],
        codec=codec.name,
        codec_spec=_codec_spec(codec) if codec.scaled or codec.low_rank else None,
        dtype=codec.true_dtype,
        format=cfg.format,
        compressor=_compressor(cfg),
        dataset_fingerprint=cache.dataset.fingerprint,
        view_plan=cache.view_plan,
        grid_mode=shape.get("grid_mode"),
        resample=shape.get("resample"),
    )


def _compressor(cfg: ExtractConfig) -> str:
    """The compressor a store's chunks get: WebDataset shards are plain tars, so always none there."""
    from sak.pipeline.store.zarr import check_compressor

    return "none" if cfg.format == "wds" else check_compressor(cfg.compressor)


def _codec_spec(codec) -> CodecSpec:
    return load(CodecSpec, codec.describe(), f"codec {codec.name}")


def _store_plan(
    cfg: ExtractConfig, cache: CacheManifest, out: Path, spec: TeacherSpec, choice: WeightsChoice
) -> StorePlan:
    codec = get_codec(cfg.codec)
    weights = load(WeightsRecord, choice.describe(spec), f"weights of {spec.name}")
    blocks = select_levels(spec, cfg.levels)
    grid = resolve_grid(spec, cfg.size, cfg.grid)
    identity = _store_identity(cfg, cache, spec, weights)
    fp = store_fingerprint(identity)
    path = out / "teachers" / fp
    created = read_store_manifest(path).created if (path / STORE_MANIFEST).exists() else now_iso()
    grids = {b: (*grid, spec.dim) for b in blocks}
    if codec.low_rank and codec.rank >= spec.dim:
        log.warning(
            f"{spec.name} has {spec.dim} channels: --codec {codec.name} keeps all {spec.dim} (k clipped to the "
            f"channel count): an exact rotation, no smaller than fp16"
        )
    manifest = StoreManifest(
        schema_version=SCHEMA_VERSION,
        fingerprint=fp,
        teacher=TeacherRecord(
            name=spec.name,
            family=spec.family,
            timm_name=spec.timm_name,
            pretrained_tag=spec.pretrained_tag,
            depth=spec.depth,
            dim=spec.dim,
            patch_size=spec.patch_size,
            tiny=spec.tiny,
        ),
        weights=weights,
        random_init=weights.random_init,
        identity=identity,
        format=cfg.format,
        codec=codec.name,
        codec_spec=_codec_spec(codec),
        num_views=cache.num_views,
        shard_size=cache.shard_size,
        levels=level_records(cfg.format, codec, cache.num_views, grids),
        views_sha256=cache.views.sha256,
        dataset_fingerprint=cache.dataset.fingerprint,
        view_plan=cache.view_plan,
        skipped_inputs=cache.dataset.skipped,
        created=created,
        code_version=code_version(),
        config=_config_record(cfg),
        shards=[],
        complete=False,
        stats=[],
        throughput=Throughput(
            views_this_run=0, seconds_this_run=0.0, views_per_s=None, steady_views_per_s=None
        ),
        updated=created,
    )
    create_teacher_store(cfg.format, path, cache.num_views, cache.shard_size, grids, codec, _compressor(cfg))
    url = cfg.out if is_url(cfg.out) else None
    return StorePlan(
        spec, choice, fp, path, manifest, blocks=blocks, grid=grid, done=read_journal(path), cache_url=url
    )


def _config_record(cfg: ExtractConfig) -> ExtractRecord:
    rec = dataclasses.asdict(cfg)
    rec.update(teachers=list(cfg.teachers), weights=dict(cfg.weights))
    return ExtractRecord(**rec)


def _register_stores(
    out: Path, cache: CacheManifest, stores: list[StorePlan], finished: bool
) -> CacheManifest:
    """List the stores in cache.json; once finished, as their manifests say, with the manifests' sha256
    (so an edited manifest shows)."""
    entries = dict(cache.stores)
    for sp in stores:
        old = entries.get(sp.fingerprint)
        entries[sp.fingerprint] = StoreEntry(
            teacher=sp.spec.name,
            path=f"teachers/{sp.fingerprint}",
            format=sp.manifest.format,
            codec=sp.manifest.codec,
            complete=sp.manifest.complete if finished else False,
            random_init=sp.manifest.random_init,
            manifest_sha256=sha256_file(sp.path / STORE_MANIFEST)
            if finished
            else old and old.manifest_sha256,
        )
    cache = write_cache(out, dataclasses.replace(cache, stores=entries))
    if stores and stores[0].cache_url:  # cache.json last: a reader sees stores only once they exist
        push_metadata(Bucket(stores[0].cache_url), out)
    return cache


def _finalize(plan: StorePlan, cache: CacheManifest, seconds: float, schedule: Schedule) -> None:
    """Write the store's manifest from its journal: shards, statistics, throughput, every file's digest."""
    shards = sorted(plan.done.values(), key=lambda r: r.shard)
    widths = [plan.spec.dim] * len(plan.blocks)
    remote = Bucket(plan.cache_url) if plan.cache_url else None
    if remote:  # the statistics were written by the workers, on their nodes
        pull(remote, plan.path.parents[1], bulk=False, under=plan.rel)
    digests = {rel: d for r in shards for rel, d in r.files.items()}
    plan.manifest = dataclasses.replace(
        plan.manifest,
        shards=[
            ShardEntry(
                index=r.shard,
                start=r.start,
                stop=r.stop,
                samples=r.stop - r.start,
                files=r.files,
                xxh3=r.xxh3,
            )
            for r in shards
        ],
        complete=len(shards) == cache.num_shards,
        stats=merge_stats(plan.path, [r.shard for r in shards], list(plan.blocks), widths),
        throughput=schedule.throughput(seconds),
        updated=now_iso(),
        files=store_files_table(plan.path, digests, _store_sizes(remote, plan.rel) if remote else None),
        fidelity=next((r.fidelity for r in shards if r.fidelity), None),  # the first shard measured
    )
    write_store_manifest(plan.path, plan.manifest)
    if remote:
        remote.put_whole(plan.path / STORE_MANIFEST, f"{plan.rel}/{STORE_MANIFEST}")


def _store_sizes(remote: Bucket, rel: str) -> dict[str, int]:
    """Every object of a store in the bucket: path relative to the store -> bytes."""
    return {k[len(rel) + 1 :]: n for k, n in remote.listing(rel).items()}


# ---------------------------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    """The driver's scheduling state: shards waiting, being cut (CPU tasks), being computed (actors)."""

    queue: list[ShardJob]  # next job last
    total_views: int
    max_in_flight: int = 1  # backpressure: shards between decode and write, 2 per worker + 1
    cutting: dict = field(default_factory=dict)  # ref -> ShardJob
    computing: dict = field(default_factory=dict)  # ref -> (ShardJob, worker index)
    live: LiveActors = field(default_factory=lambda: LiveActors(0))  # shards on each worker, lost ones
    failure: Exception | None = None
    views_done: int = 0
    first_done: float | None = None  # time and views at the first finished shard (steady-state rate)
    views_at_first: int = 0
    steady_views_per_s: float | None = None
    hold_first: bool = False  # submit nothing more until the first job has landed (a pca<k> basis fit)

    @classmethod
    def of(cls, jobs: list[ShardJob]) -> Schedule:
        return cls(list(reversed(jobs)), sum(j.views for j in jobs))

    def start(self, n_workers: int) -> None:
        self.live, self.max_in_flight = LiveActors(n_workers), 2 * n_workers + 1

    def can_submit(self) -> bool:
        in_flight = len(self.cutting) + len(self.computing)
        if self.hold_first and in_flight:
            return False
        return bool(self.queue) and self.failure is None and in_flight < self.max_in_flight

    def busy(self) -> bool:
        return bool((self.queue and self.failure is None) or self.cutting or self.computing)

    def idlest_worker(self) -> int:
        return self.live.idlest()

    def lost(self, job: ShardJob, worker: int, error: BaseException) -> bool:
        """The worker computing `job` was lost (its node gone): queue the job for another live worker.
        False when that is not possible (no worker left, or the shard was retried too often)."""
        if self.failure is not None or not lost_actor(error) or not self.live.lose(worker, job.shard):
            return False
        log.warning(f"shard {job.shard}: its worker was lost ({type(error).__name__}); computing it again")
        self.queue.append(job)
        self.max_in_flight = 2 * (len(self.live.load) - len(self.live.dead)) + 1
        return True

    def landed(self, job: ShardJob) -> None:
        self.hold_first = False
        self.views_done += job.views
        if self.first_done is None:
            self.first_done, self.views_at_first = time.monotonic(), self.views_done
        elif self.views_done > self.views_at_first:
            rate = (self.views_done - self.views_at_first) / max(time.monotonic() - self.first_done, 1e-9)
            self.steady_views_per_s = round(rate, 3)

    def throughput(self, seconds: float) -> Throughput:
        return Throughput(
            views_this_run=self.views_done,
            seconds_this_run=round(seconds, 3),  # includes start-up: actors, teacher loading
            views_per_s=round(self.views_done / seconds, 3) if seconds > 0 else None,
            steady_views_per_s=self.steady_views_per_s,  # from the first finished shard to the last
        )


def _needs_basis(stores: list[StorePlan]) -> bool:
    """Whether a pca<k> store still needs its basis (fitted by the worker that computes shard 0); a store
    that records shards but lost its basis is refused."""
    needs = False
    for sp in stores:
        if sp.cache_url and not sp.done and has_basis(sp.path) and not _readable_basis(sp):
            log.warning(f"store {sp.fingerprint}: discarding a partly uploaded pca basis (no shard uses it)")
            discard_bases(Bucket(sp.cache_url).sub(sp.rel), sp.path)
        if not get_codec(sp.manifest.codec).low_rank or has_basis(sp.path):
            continue
        if sp.done:
            raise SakError(
                f"store {sp.fingerprint} records {len(sp.done)} shard(s) but its pca basis (basis/) is "
                f"missing, so they cannot be decoded; delete {sp.path} and re-run"
            )
        needs = True
    return needs


def _readable_basis(sp: StorePlan) -> bool:
    """Whether the store's basis, as mirrored from the bucket, opens whole (an upload cut short does not)."""
    try:
        read_bases(sp.path, sp.manifest.format, list(sp.blocks))
    except SakError:
        return False
    return True


def _shard_jobs(cache: CacheManifest, stores: list[StorePlan]) -> list[ShardJob]:
    jobs = []
    for s in range(cache.num_shards):
        todo = tuple(sp.spec.name for sp in stores if s not in sp.done)
        if todo:
            jobs.append(
                ShardJob(s, s * cache.shard_size, min((s + 1) * cache.shard_size, cache.num_views), todo)
            )
    if cache.num_shards > len(jobs):
        log.info(f"skipping {cache.num_shards - len(jobs)} shard(s) already done; {len(jobs)} to compute")
    return jobs


def _start_workers(cfg: ExtractConfig, stores: list[StorePlan], n_jobs: int) -> list:
    """TeacherWorker actors, one per GPU (or per two CPUs), each holding every selected teacher; placed,
    restarted and retried as pipeline/actors.py says (shared with `sak-cache stage2`)."""
    placement = actor_placement(cfg.workers, n_jobs)
    jobs = [sp.job() for sp in stores]
    args = (jobs, cfg.size, cfg.normalization, cfg.batch_size, placement.threads)
    return start_actors(TeacherWorker, placement, *args)


def _run_shards(cfg: ExtractConfig, out: Path, stores: list[StorePlan], schedule: Schedule) -> None:
    """Compute every queued shard: cut its views (CPU task), run the teachers (actor), journal the result."""
    import ray

    if not schedule.queue:
        return
    rows = view_rows(out)
    sizes = sorted({sp.spec.model_input_side(cfg.size) if sp.spec.fixed_input else cfg.size for sp in stores})
    workers = _start_workers(cfg, stores, len(schedule.queue))
    schedule.start(len(workers))
    cut = ray.remote(num_cpus=1)(cut_shard_views)
    bar = Progress(schedule.total_views, "views", "extract", enabled=cfg.progress)
    try:
        while schedule.busy():
            while schedule.can_submit():
                job = schedule.queue.pop()
                where = cfg.out if is_url(cfg.out) else str(out)
                schedule.cutting[cut.remote(where, rows[job.start : job.stop], sizes)] = job
            ready, _ = ray.wait(list(schedule.cutting) + list(schedule.computing), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in schedule.cutting:
                    job = schedule.cutting.pop(ref)
                    if schedule.failure is None:
                        w = schedule.idlest_worker()
                        schedule.computing[workers[w].process.remote(job, ref)] = (job, w)
                    continue
                job, w = schedule.computing.pop(ref)
                schedule.live.load[w] -= 1
                try:
                    records = ray.get(ref)
                except Exception as e:  # keep what is done; report after in-flight shards settle
                    if not schedule.lost(job, w, e):
                        schedule.failure = schedule.failure or e
                    continue
                _journal(stores, records)
                schedule.landed(job)
                bar.update(job.views)
    finally:
        bar.close()
        stop_actors(workers)
    if schedule.failure is not None:
        raise shard_failure_error(schedule.failure, out, sum(len(sp.done) for sp in stores))


def _journal(stores: list[StorePlan], records: dict[str, ShardRecord]) -> None:
    """A shard counts as done once its record is in the store's journal (fsynced)."""
    by_name = {sp.spec.name: sp for sp in stores}
    for name, record in records.items():
        sp = by_name[name]
        append_journal(sp.path, record)
        if sp.cache_url:  # the workers uploaded and checked the shard's objects before returning
            Bucket(sp.cache_url).put_whole(sp.path / JOURNAL, f"{sp.rel}/{JOURNAL}")
        sp.done[record.shard] = record


def view_rows(out: Path) -> list[ViewRow]:
    """views.parquet joined with the image index: everything a CPU task needs to cut a view."""
    views = read_table(out / VIEWS_FILE).to_pylist()
    index = {r["key"]: r for r in read_table(out / IMAGE_INDEX_FILE).to_pylist()}
    rows = []
    for v in views:
        img = index.get(v["key"])
        if img is None:
            raise SakError(f"{out}: views.parquet names image {v['key']!r} that images/index.parquet lacks")
        box = (v["x0"], v["y0"], v["x1"], v["y1"])
        rows.append(ViewRow(v["key"], img["image_shard"], img["offset"], img["nbytes"], box, bool(v["flip"])))
    return rows


def read_table(path: Path):
    """A Parquet table of the cache; a damaged or missing one is a one-line SakError naming it."""
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SakError(
            f"{path} cannot be read ({type(e).__name__}); the file is damaged: run `sak-cache verify`"
        ) from e


# ------------------------------------------------------------------------------------------------ worker


class TeacherWorker:
    """Holds every selected teacher, loaded once; computes and writes whole shards (a Ray actor).

    Two calls may run at once (max_concurrency=2): the forward passes take a lock, so one shard's
    compression and file writes overlap the next shard's teacher compute.
    """

    def __init__(
        self, stores: list[StoreJob], plan_size: int, normalization: str, batch_size: int, threads: int
    ) -> None:
        from sak.pipeline.teachers import get_teacher

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.teachers, self.stores, self.sizes, self.shapes = {}, {}, {}, {}
        self.fidelity_shard: dict[str, int] = {}
        self.uploads: dict[str, tuple[str, str]] = {}  # teacher -> (cache URL, store path in the bucket)
        for s in stores:
            spec = get_teacher(s.teacher)
            self.teachers[spec.name] = load_teacher(spec, s.weights, plan_size, normalization, self.device)
            path = s.path
            if s.cache_url:  # write in this node's mirror, upload each shard's objects whole
                rel = f"teachers/{Path(s.path).name}"
                path = str(node_mirror(s.cache_url, [], metadata=True) / rel)
                self.uploads[spec.name] = (s.cache_url, rel)
            self.stores[spec.name] = open_teacher_store(s.format, path, s.codec, s.shard_size)
            self.shapes[spec.name] = (s.blocks, s.grid)  # kept blocks, stored (H, W)
            self.fidelity_shard[spec.name] = s.fidelity_shard
            self.sizes[spec.name] = spec.model_input_side(plan_size) if spec.fixed_input else plan_size
        self.lock = threading.Lock()

    def process(self, job: ShardJob, views: dict[int, object]) -> dict[str, ShardRecord]:
        t0 = time.monotonic()
        feats: dict[str, list[torch.Tensor]] = {}
        native: dict[str, list[torch.Tensor]] = {}  # first shard of a lossy store: fp32 before resampling
        with self.lock:
            for name in job.teachers:
                keep = job.shard == self.fidelity_shard[name]
                feats[name], native[name] = self._forward(name, views, keep_native=keep)
        records = {}
        for name, levels in feats.items():
            store, (blocks, _) = self.stores[name], self.shapes[name]
            for block, level in zip(blocks, levels):
                refuse_overflow(store.codec, level, name, block)
            remote = self._remote(name)  # a URL cache: the store in its bucket
            prepare_bases(store, job.shard, dict(zip(blocks, levels)), remote)  # pca<k>: fit on shard 0 first
            fidelity = None
            if native[name]:  # measured before writing: the stored bytes are the same encoding
                fidelity = measure_levels(
                    store.codec, dict(zip(blocks, native[name])), dict(zip(blocks, levels)), store.bases
                )
            files = store.write_shard(job.shard, job.start, dict(zip(blocks, levels)))
            stats = save_stats(store.path, job.shard, shard_stats([lv.numpy() for lv in levels]))
            fast = {rel: xxh3_file(store.path / rel) for rel in files}  # page-cached: ~6 GB/s
            if remote is not None:  # uploaded and checked before the driver journals the shard
                push(remote, Path(store.path), [*files, stats])
            records[name] = ShardRecord(
                shard=job.shard,
                start=job.start,
                stop=job.stop,
                files=files,
                seconds=time.monotonic() - t0,
                xxh3=fast,
                fidelity=fidelity,
            )
        return records

    def _remote(self, name: str) -> Bucket | None:
        """A teacher's store in its bucket (None: a local cache)."""
        if name not in self.uploads:
            return None
        url, rel = self.uploads[name]
        return Bucket(url).sub(rel)

    def _forward(
        self, name: str, views: dict[int, object], keep_native: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One teacher on one shard's views: its kept levels on the store grid, (n, h, w, C) float32 on the
        CPU, and, when `keep_native` and the store is lossy, the same levels on the native grid."""
        teacher, store = self.teachers[name], self.stores[name]
        blocks, grid = self.shapes[name]
        batch_views = torch.from_numpy(views[self.sizes[name]].copy())  # (n, 3, s, s) uint8
        parts, native = [], []
        for i in range(0, batch_views.shape[0], self.batch_size):
            x = batch_views[i : i + self.batch_size].to(self.device, non_blocking=True)
            # run up to the deepest kept block, resample on the device, then copy the (smaller) targets:
            # host-device sync
            maps = teacher.forward_levels(x, blocks)
            shaped = shape_targets(teacher.spec, maps, blocks, grid)
            parts.append([shaped[b].cpu() for b in blocks])
            native_hw = tuple(maps[0].shape[1:3])
            if keep_native and is_lossy(store.codec, native_hw, grid):
                kept = shape_targets(teacher.spec, maps, blocks, native_hw)  # the kept blocks, not resampled
                native.append([kept[b].float().cpu() for b in blocks])
        levels = [torch.cat([p[level] for p in parts]) for level in range(len(blocks))]
        return levels, [
            torch.cat([p[level] for p in native]) for level in range(len(blocks))
        ] if native else []
