"""`sak-cache inspect` and `sak-cache ls`: what a cache (or a stage-2 target cache) holds, in a few lines,
for a folder or a bucket URL; `ls` also says whether each cache verifies (its records, or every byte).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.units import UNITS_NOTE, human_bytes
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, stage_dir
from sak.pipeline.format.documents import (
    is_stage2_cache,
    read_cache,
    read_stage2_cache,
    read_store_manifest,
    stores_in_progress,
)
from sak.pipeline.format.journal import read_journal
from sak.pipeline.format.layout import CACHE_FILE
from sak.pipeline.format.records import StoreManifest
from sak.pipeline.inspection.verify import check_bucket_cache, check_cache, records_problems
from sak.pipeline.store.fidelity import fidelity_warnings, format_fidelity


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_cache(
    cache_dir: str | Path, shown: str | None = None, sizes: dict[str, int] | None = None
) -> str:
    """The `inspect` text: dataset, plan, images and one row per teacher store, random-init flagged.
    A bucket cache: cache_dir mirrors its metadata, `shown` is its URL, `sizes` its objects' bytes."""
    root = Path(cache_dir)
    if is_stage2_cache(root):
        return describe_stage2(root, shown, sizes)
    cache = read_cache(root)
    root = shown or root
    ds, plan = cache.dataset, cache.view_plan
    img_bytes = sum(t.bytes for t in cache.images.shards)
    lines = [
        f"cache    {root}  (schema {cache.schema_version}, written by sak-cache {cache.code_version})",
        f"source   {ds.source}: {ds.num_images} images used, {len(ds.skipped)} skipped",
        f"views    {cache.num_views} ({plan.views_per_image} per image, {plan.size}px, seed {plan.seed}, "
        f"{plan.algorithm}), {cache.num_shards} shard(s) of {cache.shard_size}",
        f"images   {len(cache.images.shards)} tar(s), {human_bytes(img_bytes)}  (sizes in {UNITS_NOTE})",
    ]
    if cache.student_views is not None:
        sv = cache.student_views
        lines.append(
            f"student  raw views {sv.size}x{sv.size} uint8 in {sv.array}/ (the loader skips decoding)"
        )
    for s in ds.skipped[:20]:
        lines.append(f"  skipped {s.origin}: {s.reason}")
    header = f"{'teacher':<12} {'fingerprint':<26} {'levels':<14} {'shape (H,W,C)':<15} {'codec':<5} {'done':>9} {'bytes':>10} {'per view':>10}"
    lines += ["", header, "-" * len(header)]
    warnings, busy = [], stores_in_progress(cache_dir, cache)
    for fp, entry in cache.stores.items():
        store_dir = Path(cache_dir) / entry.path
        if fp in busy:  # its manifest is written when that run ends
            done = f"{len(read_journal(store_dir))}/{cache.num_shards}"
            lines.append(f"{entry.teacher:<12} {fp:<26} in progress ({busy[fp]}): {done} shards so far")
            continue
        try:
            m = read_store_manifest(store_dir)
        except SakError as e:
            lines.append(f"{entry.teacher:<12} {fp:<26} unreadable manifest: {e}")
            continue
        nbytes = _prefix_bytes(sizes, entry.path) if sizes is not None else _dir_bytes(store_dir)
        blocks = ",".join(str(lv.block) for lv in m.levels)
        shape = "x".join(str(v) for v in m.levels[0].shape[1:]) if m.levels else "-"
        if m.levels and m.levels[0].channels is not None:  # pca<k>: decoded H x W x C, stored k
            shape = f"{'x'.join(str(v) for v in m.levels[0].shape[1:3])}x{m.levels[0].channels} k{m.levels[0].shape[3]}"
        done = f"{len(m.shards)}/{cache.num_shards}"
        codec = f"{m.codec}/{m.format}"  # e.g. fp16/zarr, int8/wds
        lines.append(
            f"{entry.teacher:<12} {fp:<26} {blocks:<14} {shape:<15} {codec:<5} {done:>9} "
            f"{human_bytes(nbytes):>10} {human_bytes(nbytes / max(1, cache.num_views)):>10}"
        )
        lines.append("  " + _store_details(m))
        lines += format_fidelity(m)
        if m.throughput.actor_peak_rss_bytes is not None:
            lines.append(
                f"  peak host memory per teacher actor: {human_bytes(m.throughput.actor_peak_rss_bytes)}"
            )
        if m.weights.random_init:
            warnings.append(
                f"WARNING: {entry.teacher} ({fp}) holds features of a RANDOM-INIT model "
                f"({m.weights.id}): not a real teacher, for tests only"
            )
    if not cache.stores:
        lines.append("(no teacher store yet)")
    return "\n".join(lines + ([""] + warnings if warnings else []))


def _store_details(m: StoreManifest) -> str:
    """What tells two stores of one teacher apart beyond the table's columns: weights, compressor, grid."""
    w = m.weights
    weights = {
        "random": f"random init ({w.id})",
        "file": f"file {w.path or w.id}",
        "pretrained": f"pretrained {w.id}",
    }
    i = m.identity
    grid = f"grid {i.grid_mode} ({i.resample})" if i.grid_mode else "native grid"
    return f"weights {weights.get(w.source, w.id)}; compressor {i.compressor or 'zstd'}; {grid}"


def store_fidelity_warnings(
    cache_dir: str | Path, teachers: Collection[str] | None = None, codec: str | None = None
) -> list[str]:
    """`run`'s warnings: every level whose measured 1st-percentile cosine is under 0.99, of the stores
    the run touched (`teachers` at `codec`; None: every store), not of others it left alone."""
    root = Path(cache_dir)
    lines = []
    for entry in read_cache(root).stores.values():
        if (teachers is None or entry.teacher in teachers) and (codec is None or entry.codec == codec):
            lines += fidelity_warnings(entry.teacher, read_store_manifest(root / entry.path))
    return lines


def _prefix_bytes(sizes: dict[str, int], prefix: str) -> int:
    prefix = prefix.rstrip("/") + "/"
    return sum(n for rel, n in sizes.items() if rel.startswith(prefix))


@dataclass(frozen=True)
class FoundCache:
    """One cache `ls` lists: its name as shown (path or URL), a local folder with its metadata, its bytes."""

    shown: str
    local: Path
    nbytes: int
    full_check: object = None  # () -> Report: the full `verify` (None: only the records are checked)


def local_caches(root: str | Path) -> list[FoundCache]:
    root = Path(root)
    if not root.exists():
        raise SakError(f"{root} does not exist; pass a folder that holds caches")
    found = [p.parent for p in sorted(root.rglob(CACHE_FILE))]
    return [FoundCache(str(d), d, _dir_bytes(d), full_check=lambda d=d: check_cache(d)) for d in found]


def list_caches(root: str | Path, found: list[FoundCache] | None = None, full: bool = False) -> list[str]:
    """One line per cache found under a folder (or the given ones): teachers, views, bytes, created, and
    whether it verifies (its records; every byte with full=True)."""
    lines = []
    for fc in local_caches(root) if found is None else found:
        if is_stage2_cache(fc.local):
            lines.append(_stage2_line(fc.local, fc.shown, fc.nbytes))
            continue
        try:
            cache = read_cache(fc.local)
        except SakError as e:
            lines.append(f"{fc.shown}  unreadable: {e}")
            continue
        teachers = []
        busy = stores_in_progress(fc.local, cache)
        for fp, entry in cache.stores.items():
            flag = "" if entry.complete else "(in progress)" if fp in busy else "(incomplete)"
            flag += "(random-init)" if entry.random_init else ""
            teachers.append(entry.teacher + flag)
        problems = fc.full_check().problems if full and fc.full_check else records_problems(fc.local)
        what = "verify" if full else "records"
        status = f"{what} ok" if not problems else f"{what} FAIL ({len(problems)}: {problems[0]})"
        lines.append(
            f"{fc.shown}  {cache.dataset.num_images} images, {cache.num_views} views, {human_bytes(fc.nbytes)}, "
            f"created {cache.created}, teachers: {', '.join(teachers) or '-'}, {status}"
        )
    return lines


def describe_stage2(root: Path, shown: str | None = None, sizes: dict[str, int] | None = None) -> str:
    """A bucket's stage-2 cache: root mirrors its metadata, `shown` is its URL, `sizes` its objects' bytes."""
    cache = read_stage2_cache(root / CACHE_FILE)
    i = cache.identity
    lines = [
        f"stage-2 cache {shown or root}  (written by {cache.code_version}{'' if cache.complete else ', INCOMPLETE'})",
        f"data     {i.dataset} {i.split}: {i.num_images} images x {cache.epochs} epochs = {cache.rows} rows, "
        f"crop {i.crop[0]}x{i.crop[1]}, seed {i.seed}, scale {i.scale_range}, photometric {i.photometric}",
        f"teachers {'stage-1 run ' + _shown_path(cache.init) if cache.init else 'by name'}; codec {cache.codec}, "
        f"{cache.num_shards} shard(s) of {cache.shard_size}",
    ]
    warnings = []
    for t in cache.teachers or []:
        grids = ", ".join("x".join(str(v) for v in g) for g in t.grids)
        lines.append(f"  {t.teacher:<12} {t.stage1_fingerprint:<18} blocks {t.blocks}  {grids}  "
                     f"{human_bytes(_prefix_bytes(sizes, t.path) if sizes else _dir_bytes(root / t.path))}")  # fmt: skip
        if t.weights is not None and t.weights.random_init:
            warnings.append(f"WARNING: {t.teacher} is a RANDOM-INIT model ({t.weights.id}): for tests only")
    return "\n".join(lines + ([""] + warnings if warnings else []))


def _shown_path(recorded: str) -> str:
    """A recorded absolute path as a user would type it here: relative under the current folder."""
    path, here = Path(recorded), Path.cwd()
    return path.relative_to(here).as_posix() if path.is_absolute() and path.is_relative_to(here) else recorded


def _stage2_line(root: Path, shown: str, nbytes: int) -> str:
    try:
        cache = read_stage2_cache(root / CACHE_FILE)
    except SakError as e:
        return f"{shown}  unreadable: {e}"
    names = [
        t.teacher + ("(random-init)" if t.weights is not None and t.weights.random_init else "")
        for t in cache.teachers or []
    ]
    return (
        f"{shown}  stage-2 {cache.identity.dataset}: {cache.rows} rows{'' if cache.complete else ' (incomplete)'}, "
        f"{human_bytes(nbytes)}, teachers: {', '.join(names) or '-'}"
    )


def bucket_caches(url: str) -> list[FoundCache]:
    """Every cache under a URL prefix, its metadata mirrored locally (the objects' bytes from the listing)."""
    bucket = Bucket(url)
    sizes = bucket.listing()
    roots = sorted(rel[: -len(CACHE_FILE)].rstrip("/") for rel in sizes if rel.split("/")[-1] == CACHE_FILE)
    found = []
    for rel in roots:
        sub = bucket.sub(rel) if rel else bucket
        local = stage_dir(sub.url, "reader")
        pull(sub, local, bulk=False)
        nbytes = _prefix_bytes(sizes, rel) if rel else sum(sizes.values())
        found.append(FoundCache(sub.url, local, nbytes, full_check=lambda u=sub.url: check_bucket_cache(u)))
    return found


def describe_location(location: str) -> str:
    """`inspect` of a folder or a URL (metadata mirrored, bytes from the object listing)."""
    if not is_url(location):
        return describe_cache(location)
    bucket = Bucket(location)
    local = stage_dir(bucket.url, "reader")
    pull(bucket, local, bulk=False)
    return describe_cache(local, shown=bucket.url, sizes=bucket.listing())
