"""`--json` of `sak-cache inspect`, `ls` and `verify`: typed reports, each with a JSON Schema published
beside the cache format's (schema/{inspect,ls,verify}-v1.schema.json, generated from these records).

`python -m sak.pipeline.inspection.reports` (`make schema`) regenerates the shipped files; `--check`
exits 1 when a shipped file differs from what the records generate.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.typed_json import SchemaFamily, doc, schema_text, to_json
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, stage_dir
from sak.pipeline.format.documents import (
    is_stage2_cache,
    read_cache,
    read_stage2_cache,
    read_store_manifest,
    stores_in_progress,
)
from sak.pipeline.format.layout import STORE_MANIFEST
from sak.pipeline.format.records import StoreEntry
from sak.pipeline.inspection.describe import FoundCache, local_caches
from sak.pipeline.inspection.verify import Report, records_problems

REPORTS_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class StoreSummary:
    """One teacher store of an `inspect --json` report."""

    fingerprint: str
    teacher: str
    format: str
    codec: str
    random_init: bool
    blocks: list[int] = field(metadata=doc("the stored levels (teacher blocks)"))
    shards_done: int = field(metadata=doc("shards written, of the cache's num_shards"))
    bytes: int
    actor_peak_rss_bytes: int | None = field(
        metadata=doc("the largest peak host memory of a teacher actor in the last run (null: not recorded)")
    )
    weights: str | None = field(
        default=None,
        metadata=doc("the weights' id: hub tag, file digest, or random init and seed (null: in progress)"),
    )
    weights_source: Literal["random", "file", "pretrained"] | None = None
    compressor: str | None = field(
        default=None, metadata=doc("Blosc compressor of the chunks: none | lz4 | zstd (null: in progress)")
    )
    grid: list[int] | None = field(default=None, metadata=doc("the stored token grid (H, W)"))
    in_progress: str | None = field(
        default=None,
        metadata=doc(
            "set while a live `sak-cache run` adds the store: who holds the cache ('held by HOST pid N since "
            "T'); its manifest is not final, shards_done counts its journal",
            omit=True,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class InspectReport:
    """`sak-cache inspect CACHE --json`: what a view cache holds."""

    kind: Literal["sak-inspect"] = "sak-inspect"
    cache: str = field(metadata=doc("the folder or URL inspected"))
    schema_version: int
    code_version: str = field(metadata=doc("the sak-cache version that wrote the cache"))
    source: str
    num_images: int
    skipped_images: int
    num_views: int
    views_per_image: int
    size: int = field(metadata=doc("view side in pixels"))
    seed: int
    num_shards: int
    shard_size: int
    student_views: int | None = field(
        metadata=doc("side S of the raw student views stored (--student-views raw); null: none stored")
    )
    stores: list[StoreSummary]


@dataclass(frozen=True, kw_only=True)
class LsTeacher:
    teacher: str
    complete: bool
    random_init: bool


@dataclass(frozen=True, kw_only=True)
class LsEntry:
    """One cache `ls` found; `error` set (and the rest empty) when its cache.json is unreadable."""

    cache: str
    kind: Literal["cache", "stage2", "unreadable"]
    bytes: int
    images: int | None = field(metadata=doc("images used (view caches)"))
    rows: int | None = field(metadata=doc("views (view caches) or (epoch, image) rows (stage-2 caches)"))
    created: str | None
    complete: bool | None = field(metadata=doc("stage-2 caches: every shard written"))
    teachers: list[LsTeacher]
    checked: Literal["records", "verify", "none"]
    problems: list[str]
    error: str | None


@dataclass(frozen=True, kw_only=True)
class LsReport:
    """`sak-cache ls ROOT --json`: every cache under ROOT."""

    kind: Literal["sak-ls"] = "sak-ls"
    root: str
    caches: list[LsEntry]


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """`sak-cache verify CACHE --json`: ok exactly when problems is empty (the exit code is 1 otherwise)."""

    kind: Literal["sak-verify"] = "sak-verify"
    cache: str
    ok: bool
    problems: list[str] = field(metadata=doc("each fails verify, naming the file and shard"))
    notes: list[str] = field(metadata=doc("facts worth knowing that do not fail verify"))
    in_progress: list[str] | None = field(
        default=None,
        metadata=doc("stores a live `sak-cache run` is adding, naming the holder: not verified", omit=True),
    )


def _family(cls: type, name: str) -> SchemaFamily:
    file = f"{name}-v{REPORTS_VERSION}.schema.json"
    return SchemaFamily(
        package="sak.pipeline",
        file=file,
        schema_id=f"https://sak-cache.invalid/schema/{file}",
        title=f"sak-cache {name} --json v{REPORTS_VERSION}",
        description=f"What `sak-cache {name} --json` prints. Generated from sak.pipeline.inspection.reports.",
        documents=(cls,),
        roots=(cls,),
        damaged_hint=f"not the output of `sak-cache {name} --json` v{REPORTS_VERSION}",
    )


REPORT_SCHEMAS = {
    InspectReport: _family(InspectReport, "inspect"),
    LsReport: _family(LsReport, "ls"),
    VerifyReport: _family(VerifyReport, "verify"),
}


def report_json(report: InspectReport | LsReport | VerifyReport) -> dict:
    return to_json(report)


def inspect_report(location: str) -> InspectReport:
    """`inspect --json` of a folder or a URL (metadata mirrored, bytes from the object listing)."""
    if not is_url(location):
        return _inspect_local(Path(location), location, None)
    bucket = Bucket(location)
    local = stage_dir(bucket.url, "reader")
    pull(bucket, local, bulk=False)
    return _inspect_local(local, bucket.url, bucket.listing())


def _inspect_local(root: Path, shown: str, sizes: dict[str, int] | None) -> InspectReport:
    if is_stage2_cache(root):
        raise SakError(
            f"{shown} is a stage-2 cache: --json describes view caches; run `sak-cache inspect {shown}`"
        )
    cache = read_cache(root)
    stores, busy = [], stores_in_progress(root, cache)
    for fp, entry in cache.stores.items():
        prefix = entry.path.rstrip("/") + "/"
        nbytes = (
            sum(n for rel, n in sizes.items() if rel.startswith(prefix))
            if sizes is not None
            else sum(p.stat().st_size for p in (root / entry.path).rglob("*") if p.is_file())
        )
        if fp in busy:
            stores.append(_in_progress_summary(root, fp, entry, nbytes, str(busy[fp])))
            continue
        m = read_store_manifest(root / entry.path)
        stores.append(
            StoreSummary(
                fingerprint=fp,
                teacher=entry.teacher,
                format=m.format,
                codec=m.codec,
                random_init=m.weights.random_init,
                blocks=[lv.block for lv in m.levels],
                shards_done=len(m.shards),
                bytes=nbytes,
                actor_peak_rss_bytes=m.throughput.actor_peak_rss_bytes,
                weights=m.weights.id,
                weights_source=m.weights.source,
                compressor=m.identity.compressor or "zstd",
                grid=list(m.identity.grid),
            )
        )
    ds, plan = cache.dataset, cache.view_plan
    return InspectReport(
        cache=str(shown), schema_version=cache.schema_version, code_version=cache.code_version,
        source=ds.source, num_images=ds.num_images, skipped_images=len(ds.skipped),
        num_views=cache.num_views, views_per_image=plan.views_per_image, size=plan.size, seed=plan.seed,
        num_shards=cache.num_shards, shard_size=cache.shard_size, stores=stores,
        student_views=cache.student_views.size if cache.student_views else None,
    )  # fmt: skip


def _in_progress_summary(root: Path, fp: str, entry: StoreEntry, nbytes: int, holder: str) -> StoreSummary:
    """A store being added: what cache.json and its journal say (its manifest is written at the end)."""
    from sak.pipeline.format.journal import read_journal

    manifest = root / entry.path / STORE_MANIFEST
    m = read_store_manifest(root / entry.path) if manifest.is_file() else None
    return StoreSummary(
        fingerprint=fp, teacher=entry.teacher, format=entry.format, codec=entry.codec,
        random_init=entry.random_init, blocks=[lv.block for lv in m.levels] if m else [],
        shards_done=len(read_journal(root / entry.path)), bytes=nbytes, actor_peak_rss_bytes=None,
        in_progress=holder,
    )  # fmt: skip


def ls_report(root: str, found: list[FoundCache] | None = None, full: bool = False) -> LsReport:
    """`ls --json`: the entries `list_caches` prints, typed."""
    return LsReport(
        root=root, caches=[_ls_entry(fc, full) for fc in (local_caches(root) if found is None else found)]
    )


def _ls_entry(fc: FoundCache, full: bool) -> LsEntry:
    empty = dict(
        images=None, rows=None, created=None, complete=None, teachers=[], checked="none", problems=[]
    )
    try:
        if is_stage2_cache(fc.local):
            s2 = read_stage2_cache(fc.local / "cache.json")
            teachers = [
                LsTeacher(
                    teacher=t.teacher,
                    complete=s2.complete,
                    random_init=bool(t.weights and t.weights.random_init),
                )
                for t in s2.teachers or []
            ]
            return LsEntry(cache=fc.shown, kind="stage2", bytes=fc.nbytes, error=None,
                           **{**empty, "rows": s2.rows, "complete": s2.complete, "teachers": teachers})  # fmt: skip
        cache = read_cache(fc.local)
    except SakError as e:
        return LsEntry(cache=fc.shown, kind="unreadable", bytes=fc.nbytes, error=str(e), **empty)
    problems = fc.full_check().problems if full and fc.full_check else records_problems(fc.local)
    teachers = [
        LsTeacher(teacher=e.teacher, complete=e.complete, random_init=e.random_init)
        for e in cache.stores.values()
    ]
    return LsEntry(
        cache=fc.shown, kind="cache", bytes=fc.nbytes, images=cache.dataset.num_images, rows=cache.num_views,
        created=cache.created, complete=None, teachers=teachers, checked="verify" if full else "records",
        problems=problems, error=None,
    )  # fmt: skip


def verify_report(cache: str, report: Report) -> VerifyReport:
    return VerifyReport(
        cache=cache, ok=not report.problems, problems=report.problems, notes=report.notes,
        in_progress=report.in_progress or None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for family in REPORT_SCHEMAS.values():
        path, text = family.shipped_path(), schema_text(family.generate())
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(path)
            print(f"{path} is out of date; run `make schema`", file=sys.stderr)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
