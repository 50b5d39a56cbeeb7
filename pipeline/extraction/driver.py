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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import CacheLock
from sak.pipeline.base.provenance import SCHEMA_VERSION, code_version, now_iso, sha256_file
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.lock import BucketLock
from sak.pipeline.buckets.mirror import fresh_mirror, pull, push_metadata
from sak.pipeline.extraction.actors import (
    actor_placement,
    retire,
    shard_failure_error,
    start_actors,
    stop_actors,
)
from sak.pipeline.extraction.ingest import ingest
from sak.pipeline.extraction.preprocess import cut_shard_views, view_rows
from sak.pipeline.extraction.probe import check_out_dir, probe_nodes
from sak.pipeline.extraction.runtime import Progress, log, ray_session
from sak.pipeline.extraction.schedule import Schedule
from sak.pipeline.extraction.student_views import add_student_views
from sak.pipeline.extraction.student_views import check_mode as check_views_mode
from sak.pipeline.extraction.worker import ShardJob, StoreJob, TeacherWorker
from sak.pipeline.format.documents import read_cache, read_store_manifest, write_cache, write_store_manifest
from sak.pipeline.format.journal import append_journal, read_journal
from sak.pipeline.format.layout import JOURNAL, STORE_MANIFEST
from sak.pipeline.format.manifest import merge_stats, store_files_table, store_fingerprint
from sak.pipeline.format.records import (
    CacheManifest,
    CodecSpec,
    ExtractRecord,
    Preprocessing,
    ShardEntry,
    ShardRecord,
    StoreEntry,
    StoreIdentity,
    StoreManifest,
    TeacherRecord,
    Throughput,
    WeightsRecord,
)
from sak.pipeline.format.schema import load
from sak.pipeline.sources.views import ViewPlan
from sak.pipeline.store.backends import check_format, create_teacher_store, level_records
from sak.pipeline.store.codecs import get_codec
from sak.pipeline.store.lowrank import discard_bases, has_basis, read_bases
from sak.pipeline.store.targets import (
    codec_field,
    compressor_field,
    format_field,
    grid_field,
    identity_fields,
    levels_field,
    resolve_grid,
    select_levels,
    student_views_field,
)
from sak.pipeline.teachers.forward import normalization_for
from sak.pipeline.teachers.specs import TOKEN_SELECTION, TeacherSpec, parse_teachers
from sak.pipeline.teachers.weights import WeightsChoice, resolve_weights, weights_field

DEFAULT_SHARD_VIEWS = 64


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
    weights: tuple[tuple[str, str], ...] = weights_field(
        "Local .safetensors/.pth weights for a teacher (repeatable); default: timm hub weights.",
        group="teachers",
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
            probe_nodes(out)
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
    check_out_dir(out)
    return specs, out, plan, shard_size, choices


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
    weights = choice.record(spec)
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
                    elif w in schedule.live.dead:
                        retire(workers[w])  # its restart must not take the resources the others need
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
