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
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from sak.pipeline.codecs import get_codec
from sak.pipeline.errors import SakError
from sak.pipeline.ingest import ingest
from sak.pipeline.lock import CacheLock
from sak.pipeline.manifest import (
    IMAGE_INDEX_FILE,
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
    store_fingerprint,
    write_cache,
    write_store_manifest,
)
from sak.pipeline.preprocess import cut_shard_views
from sak.pipeline.provenance import SCHEMA_VERSION, code_version, sha256_file
from sak.pipeline.runtime import Progress, log, ray_session
from sak.pipeline.store import check_format, create_teacher_store, level_records, open_teacher_store
from sak.pipeline.targets import identity_fields, resolve_grid, select_levels, shape_targets
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


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `sak-cache run` needs; recorded in every manifest it writes."""

    source: str | None  # image folder, WebDataset tars or Parquet; may be None when the cache exists
    out: str  # the cache folder
    teachers: tuple[str, ...]  # registry names, e.g. ("dinov2_l", "clip_l", "sam_l")
    views_per_image: int = 2
    size: int = 384  # view side in pixels (the student input); SAM always sees 1024
    shard_size: int | None = None  # views per shard; default: 64 rounded up to a multiple of K
    batch_size: int = 32  # views per teacher forward
    limit: int | None = None  # use only the first N images (sorted by key)
    address: str | None = None  # Ray cluster address; None = embedded local Ray
    weights: tuple[tuple[str, str], ...] = ()  # (teacher, local weights file)
    random_init: bool = False  # random weights for every teacher without --weights (tests, demos)
    seed: int = 0  # view plan seed, and the seed of random-init weights
    normalization: str = "teacher"  # "teacher": each teacher's own mean/std; "imagenet": the paper code's
    codec: str = "fp16"  # codecs.py: fp16 | bf16 | fp32 | int8 | fp8 | ...
    format: str = "zarr"  # store format: zarr | wds
    levels: str = "all"  # tap positions to keep (targets.py): "all", "1,3", "-1"
    grid: str = "native"  # target grid (targets.py): native | student | HxW
    workers: int | None = None  # teacher actors; default one per GPU, or half the CPUs
    object_store_mb: int = 1024  # embedded Ray's object store
    min_image_side: int = 32
    max_pixels: int = 178_956_970
    progress: bool = True

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
    manifest: dict
    blocks: tuple[int, ...]  # kept levels
    grid: tuple[int, int]  # stored (H, W)
    done: dict[int, ShardRecord] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ driver


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SakError(f"cannot write to output folder {out}: {e.strerror}; pass a writable --out") from e


def _open_or_ingest(cfg: ExtractConfig, out: Path, plan: ViewPlan, shard_size: int) -> dict:
    if (out / "cache.json").exists():
        cache = read_cache(out)
        stored = ViewPlan.from_dict(cache["view_plan"])
        for name, mine, theirs in (
            ("--views-per-image", plan.views_per_image, stored.views_per_image),
            ("--size", plan.size, stored.size),
            ("--seed", plan.seed, stored.seed),
        ):
            if mine != theirs:
                raise SakError(
                    f"{out} was created with {name} {theirs}, this run asks for {mine}; "
                    f"use the same value to add a store, or another --out for a new cache"
                )
        if cfg.shard_size is not None and shard_size != cache["shard_size"]:
            raise SakError(f"{out} has --shard-size {cache['shard_size']}, this run asks for {shard_size}")
        log.info(f"reusing images and views of {out} ({cache['num_views']} views)")
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
    )


def _store_plan(
    cfg: ExtractConfig, cache: dict, out: Path, spec: TeacherSpec, choice: WeightsChoice
) -> StorePlan:
    codec = get_codec(cfg.codec)
    weights = choice.describe(spec)
    mean, std = normalization_for(spec, cfg.normalization)
    side = spec.model_input_side(cfg.size)
    blocks = select_levels(spec, cfg.levels)
    grid = resolve_grid(spec, cfg.size, cfg.grid)
    identity = {
        "schema_version": SCHEMA_VERSION,
        "teacher": spec.name,
        "timm_name": spec.timm_name,
        "pretrained_tag": spec.pretrained_tag,
        "model_kwargs": dict(spec.model_kwargs),
        "weights": weights["id"],
        "input_size": [side, side],
        "view_size": cfg.size,
        "preprocessing": {
            "resize": "cut_view: bicubic+antialias, float32, rounded to uint8",
            "normalization": cfg.normalization,
            "mean": mean,
            "std": std,
            "pad": "zeros right/bottom after normalisation" if spec.fixed_input else None,
        },
        "levels": list(blocks),
        "token_selection": TOKEN_SELECTION,
        "grid": list(grid),
        "codec": codec.name,
        **codec.identity(),  # scaled codecs: granularity, group, scale dtype
        "dtype": codec.true_dtype,
        "format": cfg.format,
        "dataset_fingerprint": cache["dataset"]["fingerprint"],
        "view_plan": cache["view_plan"],
    }
    identity.update(identity_fields(spec, cfg.size, cfg.levels, cfg.grid))  # levels, grid (+ mode, resample)
    fp = store_fingerprint(identity)
    path = out / "teachers" / fp
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "sak-teacher-store",
        "fingerprint": fp,
        "teacher": {
            "name": spec.name,
            "family": spec.family,
            "timm_name": spec.timm_name,
            "pretrained_tag": spec.pretrained_tag,
            "depth": spec.depth,
            "dim": spec.dim,
            "patch_size": spec.patch_size,
            "tiny": spec.tiny,
        },
        "weights": weights,
        "random_init": weights["random_init"],
        "identity": identity,
        "format": cfg.format,
        "codec": codec.name,
        "codec_spec": codec.describe(),
        "num_views": cache["num_views"],
        "shard_size": cache["shard_size"],
        "levels": level_records(
            cfg.format, codec, cache["num_views"], {b: (*grid, spec.dim) for b in blocks}
        ),
        "views_sha256": cache["views"]["sha256"],
        "dataset_fingerprint": cache["dataset"]["fingerprint"],
        "view_plan": cache["view_plan"],
        "skipped_inputs": cache["dataset"]["skipped"],
        "created": now_iso(),
        "code_version": code_version(),
        "config": _config_record(cfg),
        "shards": [],
        "complete": False,
        "stats": [],
        "throughput": {},
    }
    plan = StorePlan(spec, choice, fp, path, manifest, blocks=blocks, grid=grid)
    if (path / "manifest.json").exists():
        old = read_store_manifest(path)
        plan.manifest["created"] = old.get("created", plan.manifest["created"])
    create_teacher_store(
        cfg.format,
        path,
        cache["num_views"],
        cache["shard_size"],
        {b: (*grid, spec.dim) for b in blocks},
        codec,
    )
    plan.done = read_journal(path)
    return plan


def _config_record(cfg: ExtractConfig) -> dict:
    rec = dataclasses.asdict(cfg)
    rec["weights"] = dict(cfg.weights)
    return rec


def _finalize(plan: StorePlan, cache: dict, seconds: float, counter: dict) -> None:
    shards = sorted(plan.done.values(), key=lambda r: r.shard)
    m = plan.manifest
    m["shards"] = [
        {"index": r.shard, "start": r.start, "stop": r.stop, "samples": r.stop - r.start, "files": r.files}
        for r in shards
    ]
    m["complete"] = len(shards) == cache["num_shards"]
    m["stats"] = [
        {"block": b, **s}
        for b, s in zip(
            plan.blocks,
            merge_stats(plan.path, [r.shard for r in shards], [plan.spec.dim] * len(plan.blocks)),
        )
    ]
    views_done = counter["views"]
    m["throughput"] = {
        "views_this_run": views_done,
        "seconds_this_run": round(seconds, 3),  # includes start-up: actors, teacher loading
        "views_per_s": round(views_done / seconds, 3) if seconds > 0 else None,
        # from the first finished shard to the last: the rate once every actor is busy
        "steady_views_per_s": counter.get("steady_views_per_s"),
    }
    m["updated"] = now_iso()
    write_store_manifest(plan.path, m)


def run_extraction(cfg: ExtractConfig) -> Path:
    """Run (or resume) an extraction; returns the cache folder."""
    specs = parse_teachers(list(cfg.teachers))
    out = Path(cfg.out).expanduser().resolve()
    if cfg.source is not None and not Path(cfg.source.split("{")[0].split("*")[0]).exists():
        raise SakError(
            f"source {cfg.source} does not exist; pass --source with an image folder, .tar shards "
            f"or .parquet files"
        )
    if cfg.batch_size < 1:
        raise SakError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    get_codec(cfg.codec)
    check_format(cfg.format)
    for spec in specs:  # a bad --levels or --grid fails before any work
        select_levels(spec, cfg.levels)
        resolve_grid(spec, cfg.size, cfg.grid)
    plan = ViewPlan(seed=cfg.seed, views_per_image=cfg.views_per_image, size=cfg.size)
    shard_size = cfg.resolved_shard_size()
    choices = resolve_weights(specs, dict(cfg.weights), cfg.random_init, cfg.seed)
    _check_out_dir(out)

    with CacheLock(out), ray_session(cfg.address, None, cfg.object_store_mb):
        cache = _open_or_ingest(cfg, out, plan, shard_size)
        stores = [_store_plan(cfg, cache, out, s, choices[s.name]) for s in specs]
        for sp in stores:  # register stores early so `inspect` shows a run in progress
            cache["stores"][sp.fingerprint] = {
                "teacher": sp.spec.name,
                "path": f"teachers/{sp.fingerprint}",
                "format": cfg.format,
                "codec": cfg.codec,
                "complete": False,
                "random_init": sp.manifest["random_init"],
            }
        write_cache(out, cache)
        t0 = time.monotonic()
        counter = {"views": 0}
        try:
            _run_shards(cfg, cache, out, stores, counter)
        finally:
            seconds = time.monotonic() - t0
            for sp in stores:
                _finalize(sp, cache, seconds, counter)
                entry = cache["stores"][sp.fingerprint]
                entry["complete"] = sp.manifest["complete"]
                entry["manifest_sha256"] = sha256_file(sp.path / STORE_MANIFEST)  # an edited manifest shows
            write_cache(out, cache)
    for sp in stores:
        if sp.manifest["random_init"]:
            log.warning(
                f"store {sp.fingerprint} holds RANDOM-INIT {sp.spec.name} features: not a real teacher"
            )
    return out


def _run_shards(cfg: ExtractConfig, cache: dict, out: Path, stores: list[StorePlan], counter: dict) -> None:
    """Compute every shard not yet done; counts finished views into `counter` as they land."""
    import ray

    num_views, shard_size = cache["num_views"], cache["shard_size"]
    jobs = []
    for s in range(cache["num_shards"]):
        todo = [sp.spec.name for sp in stores if s not in sp.done]
        if todo:
            jobs.append(
                {
                    "shard": s,
                    "start": s * shard_size,
                    "stop": min((s + 1) * shard_size, num_views),
                    "teachers": todo,
                }
            )
    skipped = cache["num_shards"] - len(jobs)
    if skipped:
        log.info(f"skipping {skipped} shard(s) already done; {len(jobs)} to compute")
    if not jobs:
        return

    rows = _shard_rows(out)
    sizes = sorted({sp.spec.model_input_side(cfg.size) if sp.spec.fixed_input else cfg.size for sp in stores})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_workers = cfg.workers or (gpus if gpus else max(1, cpus // 2))
    n_workers = min(n_workers, len(jobs))
    threads = 1 if gpus else max(1, cpus // (2 * n_workers))
    # A worker that dies (kill -9, OOM, preemption) is restarted and its shard retried: writes are whole-shard
    # overwrites, so a retry is idempotent. Application errors (a bad file, ENOSPC) are not retried.
    worker_cls = ray.remote(TeacherWorker).options(
        num_gpus=1 if gpus else 0,
        num_cpus=1 if gpus else threads,
        max_concurrency=2,
        max_restarts=3,
        max_task_retries=3,
    )
    store_args = [
        {
            "teacher": sp.spec.name,
            "weights": dataclasses.asdict(sp.weights),
            "path": str(sp.path),
            "codec": cfg.codec,
            "shard_size": shard_size,
            "format": cfg.format,
            "blocks": list(sp.blocks),
            "grid": list(sp.grid),
        }
        for sp in stores
    ]
    workers = [
        worker_cls.remote(store_args, cfg.size, cfg.normalization, cfg.batch_size, threads)
        for _ in range(n_workers)
    ]
    cut = ray.remote(num_cpus=1)(cut_shard_views)
    by_name = {sp.spec.name: sp for sp in stores}

    max_in_flight = 2 * n_workers + 1  # backpressure: decoded views waiting + shards being computed
    bar = Progress(sum(j["stop"] - j["start"] for j in jobs), "views", "extract", enabled=cfg.progress)
    queue = list(reversed(jobs))
    cutting: dict = {}  # ref -> job
    computing: dict = {}  # ref -> (job, worker index)
    load = [0] * n_workers
    first_done: float | None = None  # time and views at the first finished shard (steady-state rate)
    views_at_first = 0
    failure: Exception | None = None
    try:
        while (queue and failure is None) or cutting or computing:
            while queue and failure is None and len(cutting) + len(computing) < max_in_flight:
                job = queue.pop()
                cutting[cut.remote(str(out), rows[job["start"] : job["stop"]], sizes)] = job
            ready, _ = ray.wait(list(cutting) + list(computing), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in cutting:
                    job = cutting.pop(ref)
                    if failure is not None:
                        continue
                    w = min(range(n_workers), key=load.__getitem__)
                    load[w] += 1
                    computing[workers[w].process.remote(job, ref)] = (job, w)
                    continue
                job, w = computing.pop(ref)
                load[w] -= 1
                try:
                    results = ray.get(ref)
                except Exception as e:  # keep what is done; report after in-flight shards settle
                    failure = failure or e
                    continue
                for name, rec in results.items():
                    record = ShardRecord.from_json(rec)
                    append_journal(by_name[name].path, record)
                    by_name[name].done[record.shard] = record
                counter["views"] += job["stop"] - job["start"]
                bar.update(job["stop"] - job["start"])
                if first_done is None:
                    first_done, views_at_first = time.monotonic(), counter["views"]
                elif counter["views"] > views_at_first:
                    rate = (counter["views"] - views_at_first) / max(time.monotonic() - first_done, 1e-9)
                    counter["steady_views_per_s"] = round(rate, 3)
    finally:
        bar.close()
        for w in workers:
            ray.kill(w)
    if failure is not None:
        msg = str(failure).strip().splitlines()
        if "No space left on device" in str(failure) or "[Errno 28]" in str(failure):
            raise SakError(
                f"no space left on the device holding {out} while writing teacher shards; free space and "
                f"re-run the same command (the {sum(len(sp.done) for sp in stores)} shard(s) already "
                f"recorded are complete and kept)"
            )
        raise SakError(
            f"extraction failed ({type(failure).__name__}: {msg[-1] if msg else ''}); the finished "
            f"shards are kept, re-run the same command to continue"
        )


def _shard_rows(out: Path) -> list[dict]:
    """views.parquet joined with the image index: everything a CPU task needs to cut a view."""
    views = pq.read_table(out / VIEWS_FILE).to_pylist()
    index = {r["key"]: r for r in pq.read_table(out / IMAGE_INDEX_FILE).to_pylist()}
    for v in views:
        img = index[v["key"]]
        v["offset"], v["nbytes"] = img["offset"], img["nbytes"]
    return views


# ------------------------------------------------------------------------------------------------ worker


class TeacherWorker:
    """Holds every selected teacher, loaded once; computes and writes whole shards (a Ray actor).

    Two calls may run at once (max_concurrency=2): the forward passes take a lock, so one shard's
    compression and file writes overlap the next shard's teacher compute.
    """

    def __init__(self, stores: list[dict], plan_size: int, normalization: str, batch_size: int, threads: int):
        from sak.pipeline.teachers import get_teacher

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.teachers, self.stores, self.sizes, self.shapes = {}, {}, {}, {}
        for s in stores:
            spec = get_teacher(s["teacher"])
            self.teachers[spec.name] = load_teacher(
                spec, WeightsChoice(**s["weights"]), plan_size, normalization, self.device
            )
            self.stores[spec.name] = open_teacher_store(s["format"], s["path"], s["codec"], s["shard_size"])
            self.shapes[spec.name] = (tuple(s["blocks"]), tuple(s["grid"]))  # kept blocks, stored (H, W)
            self.sizes[spec.name] = spec.model_input_side(plan_size) if spec.fixed_input else plan_size
        self.lock = threading.Lock()

    def process(self, job: dict, views: dict[int, object]) -> dict[str, dict]:
        t0 = time.monotonic()
        feats: dict[str, list[list[torch.Tensor]]] = {}
        with self.lock:
            for name in job["teachers"]:
                teacher = self.teachers[name]
                blocks, grid = self.shapes[name]
                batch_views = torch.from_numpy(views[self.sizes[name]].copy())  # (n, 3, s, s) uint8
                parts = []
                for i in range(0, batch_views.shape[0], self.batch_size):
                    x = batch_views[i : i + self.batch_size].to(self.device, non_blocking=True)
                    # keep and resample on the device, then copy the (smaller) targets: host-device sync
                    shaped = shape_targets(teacher.spec, teacher.forward_levels(x), blocks, grid)
                    parts.append([shaped[b].cpu() for b in blocks])
                feats[name] = [torch.cat([p[level] for p in parts]) for level in range(len(blocks))]
        records = {}
        for name, levels in feats.items():
            store, (blocks, _) = self.stores[name], self.shapes[name]
            files = store.write_shard(job["shard"], job["start"], dict(zip(blocks, levels)))
            stats = shard_stats([lv.numpy() for lv in levels])
            save_stats(store.path, job["shard"], stats)
            records[name] = ShardRecord(
                job["shard"], job["start"], job["stop"], files, time.monotonic() - t0
            ).to_json()
        return records
