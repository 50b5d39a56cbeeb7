"""The teacher stores of one `sak-cache run`: each store's plan (identity, fingerprint, manifest as it will
be written, target shape), its registration in cache.json, its journal, and its manifest written from
the journal when the run ends."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import SCHEMA_VERSION, code_version, now_iso, sha256_file
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, push_metadata
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.runtime import log
from sak.pipeline.extraction.schedule import ShardSchedule
from sak.pipeline.extraction.worker import StoreJob
from sak.pipeline.format.documents import read_store_manifest, write_cache, write_store_manifest
from sak.pipeline.format.journal import append_journal, read_journal
from sak.pipeline.format.layout import JOURNAL, STORE_MANIFEST, store_dir
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
from sak.pipeline.store.backends import create_teacher_store, level_records
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.lowrank import discard_bases, has_basis, read_bases
from sak.pipeline.store.targets import TargetShape
from sak.pipeline.teachers.forward import normalization_for
from sak.pipeline.teachers.specs import TOKEN_SELECTION, TeacherSpec
from sak.pipeline.teachers.weights import WeightsChoice


@dataclass
class StorePlan:
    spec: TeacherSpec
    weights: WeightsChoice
    fingerprint: str
    path: Path
    manifest: StoreManifest  # as it will be written (shards, stats, files filled in at the end)
    codec: Codec
    shape: TargetShape  # kept blocks on the stored grid
    done: dict[int, ShardRecord] = field(default_factory=dict)
    cache_url: str | None = None  # the bucket the store lives in (path is then the driver's mirror)

    @property
    def rel(self) -> str:
        return store_dir(self.fingerprint)

    def job(self) -> StoreJob:
        m = self.manifest
        return StoreJob(
            teacher=self.spec.name,
            path=str(self.path),
            rel=self.rel,
            codec=self.codec,
            shard_size=m.shard_size,
            format=m.format,
            shape=self.shape,
            cache_url=self.cache_url,
            # pca<k>: the basis is fitted on shard 0, so its fidelity is measured on shard 1 (held out)
            fidelity_shard=1 if self.codec.low_rank and m.num_views > m.shard_size else 0,
        )


def _store_identity(
    cfg: ExtractConfig, cache: CacheManifest, spec: TeacherSpec, weights: WeightsRecord, shape: TargetShape
) -> StoreIdentity:
    """What determines a store's bytes; the hash of its JSON is the fingerprint."""
    codec = cfg.codec
    mean, std = normalization_for(spec, cfg.normalization)
    side = spec.model_input_side(cfg.size)
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
        levels=list(shape.blocks),
        token_selection=TOKEN_SELECTION,
        grid=list(shape.grid),
        codec=codec.name,
        codec_spec=_codec_spec(codec) if codec.scaled or codec.low_rank else None,
        dtype=codec.true_dtype,
        format=cfg.format,
        compressor=_compressor(cfg),
        dataset_fingerprint=cache.dataset.fingerprint,
        view_plan=cache.view_plan,
        grid_mode=shape.grid_mode,  # off the native grid only: existing fingerprints do not change
        resample=shape.resample,
    )


def _compressor(cfg: ExtractConfig) -> str:
    """The compressor a store's chunks get: WebDataset shards are plain tars, so always none there."""
    from sak.pipeline.store.zarr import check_compressor

    return "none" if cfg.format == "wds" else check_compressor(cfg.compressor)


def _codec_spec(codec) -> CodecSpec:
    return load(CodecSpec, codec.describe(), f"codec {codec.name}")


def plan_store(
    cfg: ExtractConfig,
    cache: CacheManifest,
    out: Path,
    spec: TeacherSpec,
    choice: WeightsChoice,
    shape: TargetShape,
) -> StorePlan:
    codec = cfg.codec
    weights = choice.record(spec)
    identity = _store_identity(cfg, cache, spec, weights, shape)
    fp = store_fingerprint(identity)
    path = out / store_dir(fp)
    created = read_store_manifest(path).created if (path / STORE_MANIFEST).exists() else now_iso()
    grids = shape.grids(spec.dim)
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
    return StorePlan(spec, choice, fp, path, manifest, codec, shape, done=read_journal(path), cache_url=url)


def _config_record(cfg: ExtractConfig) -> ExtractRecord:
    """The config as the manifest records it: the codec and grid by the names the options take."""
    rec = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    rec.update(
        teachers=list(cfg.teachers), weights=dict(cfg.weights), codec=cfg.codec.name, grid=str(cfg.grid)
    )
    return ExtractRecord(**rec)


def register_stores(
    out: Path, cache: CacheManifest, stores: list[StorePlan], finished: bool
) -> CacheManifest:
    """List the stores in cache.json; once finished, as their manifests say, with the manifests' sha256
    (so an edited manifest shows)."""
    entries = dict(cache.stores)
    for sp in stores:
        old = entries.get(sp.fingerprint)
        entries[sp.fingerprint] = StoreEntry(
            teacher=sp.spec.name,
            path=sp.rel,
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


def finalize_store(plan: StorePlan, cache: CacheManifest, seconds: float, schedule: ShardSchedule) -> None:
    """Write the store's manifest from its journal: shards, statistics, throughput, every file's digest."""
    shards = sorted(plan.done.values(), key=lambda r: r.shard)
    widths = [plan.spec.dim] * len(plan.shape.blocks)
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
        stats=merge_stats(plan.path, [r.shard for r in shards], list(plan.shape.blocks), widths),
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


def needs_basis(stores: list[StorePlan]) -> bool:
    """Whether a pca<k> store still needs its basis (fitted by the worker that computes shard 0); a store
    that records shards but lost its basis is refused."""
    needs = False
    for sp in stores:
        if sp.cache_url and not sp.done and has_basis(sp.path) and not _readable_basis(sp):
            log.warning(f"store {sp.fingerprint}: discarding a partly uploaded pca basis (no shard uses it)")
            discard_bases(Bucket(sp.cache_url).sub(sp.rel), sp.path)
        if not sp.codec.low_rank or has_basis(sp.path):
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
        read_bases(sp.path, sp.manifest.format, list(sp.shape.blocks))
    except SakError:
        return False
    return True


def journal_shard(store: Path, record: ShardRecord, remote: Bucket | None = None) -> None:
    """A shard counts as done once its record is in the store's journal (fsynced); a store in a bucket
    (`remote`) gets the journal uploaded too (the worker uploaded and checked the shard's objects first).
    Shared by both builders (`run`, `stage2`)."""
    append_journal(store, record)
    if remote is not None:
        remote.put_whole(store / JOURNAL, JOURNAL)


def journal_shards(stores: list[StorePlan], records: Mapping[str, ShardRecord]) -> None:
    by_name = {sp.spec.name: sp for sp in stores}
    for name, record in records.items():
        sp = by_name[name]
        journal_shard(sp.path, record, Bucket(sp.cache_url).sub(sp.rel) if sp.cache_url else None)
        sp.done[record.shard] = record
