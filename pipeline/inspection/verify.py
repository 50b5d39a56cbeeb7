"""`sak-cache verify / inspect / ls`: check a cache against its manifests, and describe caches.

verify recomputes every digest the format records (format.py): cache.json's own content digest, image
tars, images/index.parquet, views.parquet, every store manifest, and every file of every teacher store
(shards, Zarr metadata, layout, journal, statistics); it checks the counts and that all stores describe
the same views in the same order (views.parquet digest, dataset fingerprint, view count, shard
boundaries), and reports any file in the cache the format does not name. Each problem names the file.
A v1 cache written before the `files` tables existed verifies what it records; the files it names but
does not digest are listed as notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file, stable_hash, xxh3_file
from sak.pipeline.base.units import UNITS_NOTE, human_bytes
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import pull, stage_dir
from sak.pipeline.format.documents import (
    cache_content_digest,
    is_stage2_cache,
    read_cache,
    read_stage2_cache,
    read_store_manifest,
)
from sak.pipeline.format.layout import (
    CACHE_FILE,
    IMAGE_INDEX_FILE,
    STORE_MANIFEST,
    cache_file_kind,
    store_file_kind,
)
from sak.pipeline.format.records import CacheManifest, StoreEntry, StoreManifest
from sak.pipeline.store.fidelity import fidelity_warnings, format_fidelity


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each fails verify
    notes: list[str] = field(default_factory=list)  # facts worth knowing that do not


def verify_cache(cache_dir: str | Path, progress=None) -> list[str]:
    """All problems found (empty list: the cache is intact)."""
    return check_cache(cache_dir, progress).problems


def check_cache(cache_dir: str | Path, progress=None) -> Report:
    root = Path(cache_dir)
    if is_stage2_cache(root):
        return check_stage2(root)
    cache = read_cache(root)
    report = Report()
    digests = _Digests(root, report.problems)
    if cache.content_sha256 is not None and cache_content_digest(cache) != cache.content_sha256:
        report.problems.append(f"{CACHE_FILE} was modified after it was written (its content digest differs)")
    for tar in cache.images.shards:
        if digests.check(tar.file, tar.sha256, f"image shard {tar.index}") and tar.xxh3 is not None:
            if xxh3_file(root / tar.file) != tar.xxh3:  # the loader's fast digest must agree too
                report.problems.append(
                    f"image shard {tar.index}: {tar.file} does not match its recorded xxh3"
                )
    for rel, digest in (cache.files or {}).items():
        digests.check(rel, digest.sha256, "cache file", size=digest.bytes)
    if digests.check(cache.views.file, cache.views.sha256, "views table"):
        n = _rows(root / cache.views.file, report.problems)
        if n is not None and n != cache.num_views:
            report.problems.append(f"views table: {n} rows, cache.json says {cache.num_views} views")
    _check_index(root, cache, report)
    _check_student_views(cache, digests, report)
    n_images = sum(t.count for t in cache.images.shards)
    if n_images != cache.dataset.num_images:
        report.problems.append(
            f"images: tars hold {n_images} images, cache.json says {cache.dataset.num_images}"
        )
    manifests = {}
    for fp, entry in cache.stores.items():
        manifests[fp] = _verify_store(root, cache, fp, entry, digests, report.problems, progress)
    _check_names(root, cache, manifests, report)
    return report


class _Digests:
    """sha256 checks of files relative to the cache; each file hashed once."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root, self.problems, self.seen = root, problems, {}

    def check(self, rel: str, digest: str, what: str, size: int | None = None) -> bool:
        if rel in self.seen:
            return self.seen[rel]
        path = self.root / rel
        ok = False
        if not path.is_file():
            self.problems.append(f"{what}: file {rel} is missing")
        elif (size is not None and path.stat().st_size != size) or sha256_file(path) != digest:
            self.problems.append(
                f"{what}: file {rel} does not match its recorded sha256 (corrupted or modified)"
            )
        else:
            ok = True
        self.seen[rel] = ok
        return ok


def _rows(path: Path, problems: list[str]) -> int | None:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError) as e:
        problems.append(f"file {path.name} cannot be read as Parquet ({type(e).__name__})")
        return None


def _check_index(root: Path, cache: CacheManifest, report: Report) -> None:
    """images/index.parquet: readable, and its (key, sha256) rows hash to the dataset fingerprint (this
    covers caches that do not record the index's own digest)."""
    try:
        table = pq.read_table(root / IMAGE_INDEX_FILE, columns=["key", "sha256"]).to_pydict()
    except (OSError, ValueError) as e:
        report.problems.append(f"image index: file {IMAGE_INDEX_FILE} cannot be read ({type(e).__name__})")
        return
    if stable_hash(list(zip(table["key"], table["sha256"])), 16) != cache.dataset.fingerprint:
        report.problems.append(
            f"image index: file {IMAGE_INDEX_FILE} does not match the dataset fingerprint in cache.json"
        )


def _verify_store(
    root: Path,
    cache: CacheManifest,
    fp: str,
    entry: StoreEntry,
    digests: _Digests,
    problems: list[str],
    progress,
) -> StoreManifest | None:
    where = f"store {entry.teacher} ({fp})"
    store_dir = root / entry.path
    if not (store_dir / STORE_MANIFEST).is_file():
        problems.append(f"{where}: manifest {entry.path}/{STORE_MANIFEST} is missing")
        return None
    if entry.manifest_sha256 and sha256_file(store_dir / STORE_MANIFEST) != entry.manifest_sha256:
        problems.append(
            f"{where}: {entry.path}/{STORE_MANIFEST} was modified after the run that wrote it "
            f"(its sha256 differs from cache.json)"
        )
    try:
        m = read_store_manifest(store_dir)
    except SakError as e:
        problems.append(f"{where}: {e}")
        return None
    for name, mine, expected in (
        ("views_sha256", m.views_sha256, cache.views.sha256),
        ("num_views", m.num_views, cache.num_views),
        ("shard_size", m.shard_size, cache.shard_size),
        ("dataset_fingerprint", m.dataset_fingerprint, cache.dataset.fingerprint),
        ("fingerprint", m.fingerprint, fp),
    ):
        if mine != expected:
            problems.append(
                f"{where}: manifest field {name!r} is {mine!r}, the cache has {expected!r} "
                f"(the store does not describe this cache's views)"
            )
    # every file the manifest digests (shard files are checked below, with their shard)
    shard_files = {f"{entry.path}/{rel}" for s in m.shards for rel in s.files}
    for rel, digest in (m.files or {}).items():
        if f"{entry.path}/{rel}" not in shard_files and store_file_kind(rel) != "pca basis":
            digests.check(f"{entry.path}/{rel}", digest.sha256, where, size=digest.bytes)
    problems += _verify_basis(store_dir, m, where)
    problems += (
        _verify_wds_layout(store_dir, m, where) if m.format == "wds" else _verify_arrays(store_dir, m, where)
    )
    problems += _verify_shards(cache, m, entry, digests, where, progress)
    return m


def _verify_basis(store_dir: Path, m: StoreManifest, where: str) -> list[str]:
    """A pca<k> store: every level's basis recorded in the files table and every basis file matching its
    digest; all findings in one line (without its basis the store cannot be decoded at all)."""
    levels = [lv for lv in m.levels if lv.basis is not None]
    if not levels:
        return []
    recorded = {rel: d for rel, d in (m.files or {}).items() if store_file_kind(rel) == "pca basis"}
    bad = [
        f"level {lv.block} {part} not recorded"
        for lv in levels
        for part in (lv.basis.mean, lv.basis.components)
        if not any(rel == part or rel.startswith(part + "/") for rel in recorded)
    ]
    for rel, d in sorted(recorded.items()):
        path = store_dir / rel
        if not path.is_file():
            bad.append(f"{rel} missing")
        elif path.stat().st_size != d.bytes or sha256_file(path) != d.sha256:
            bad.append(f"{rel} altered")
    if not bad:
        return []
    return [
        f"{where}: its pca basis is missing or altered ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
        f"the store cannot be decoded: delete it and re-run `sak-cache run`"
    ]


def _verify_arrays(store_dir: Path, m: StoreManifest, where: str) -> list[str]:
    import zarr

    problems = []
    for level in m.levels:
        for rel, shape in ((level.array, level.shape), (level.scales, level.scales_shape)):
            if rel is None:
                continue
            try:
                arr = zarr.open_array(str(store_dir / rel), mode="r")
            except Exception as e:  # noqa: BLE001 - any failure to open is a finding, not a crash
                problems.append(f"{where}: array {rel} cannot be opened ({type(e).__name__})")
                continue
            if list(arr.shape) != shape:
                problems.append(f"{where}: array {rel} has shape {list(arr.shape)}, manifest says {shape}")
    return problems


def _verify_shards(
    cache: CacheManifest, m: StoreManifest, entry: StoreEntry, digests: _Digests, where: str, progress
) -> list[str]:
    problems = []
    seen: dict[int, int] = {}
    for shard in m.shards:
        s = shard.index
        seen[s] = seen.get(s, 0) + 1
        expected = (s * m.shard_size, min((s + 1) * m.shard_size, m.num_views))
        if (shard.start, shard.stop) != expected:
            problems.append(
                f"{where}: shard {s} covers rows {shard.start}..{shard.stop}, expected {expected}"
            )
        for rel, digest in shard.files.items():
            path = digests.root / entry.path / rel
            if not path.is_file():
                problems.append(f"{where}: shard {s}: file {rel} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"{where}: shard {s}: file {rel} does not match its recorded sha256")
            elif shard.xxh3 is not None and rel in shard.xxh3 and xxh3_file(path) != shard.xxh3[rel]:
                problems.append(f"{where}: shard {s}: file {rel} does not match its recorded xxh3")
        if progress:
            progress(1)
    dupes = sorted(s for s, c in seen.items() if c > 1)
    if dupes:
        problems.append(f"{where}: shard(s) {dupes} recorded more than once")
    missing = sorted(set(range(cache.num_shards)) - set(seen))
    if missing:
        head = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(
            f"{where}: {len(missing)} of {cache.num_shards} shard(s) not done ({head}); "
            f"re-run `sak-cache run` to finish"
        )
    return problems


def _verify_wds_layout(store_dir: Path, m: StoreManifest, where: str) -> list[str]:
    """WebDataset store: every done shard's tar holds this cache's sample keys in order with every
    member (headers only; the sha256 check covers the bytes)."""
    from sak.pipeline.store.wds import WdsTeacherStore

    store = WdsTeacherStore(store_dir, m.codec, m.shard_size)
    blocks = [lv.block for lv in m.levels]
    problems = []
    try:
        for shard in m.shards:
            problems += [f"{where}: shard {shard.index}: {p}" for p in store.check_shard(shard.index, blocks)]
    except SakError as e:  # views.parquet unreadable: reported with the views table
        problems.append(f"{where}: sample keys cannot be read ({e})")
    return problems


def _check_student_views(cache: CacheManifest, digests: _Digests, report: Report) -> None:
    sv = cache.student_views
    if sv is None:
        return
    digests.check(f"{sv.array}/zarr.json", sv.metadata.sha256, "student views", size=sv.metadata.bytes)
    for shard in sv.shards:
        if digests.check(shard.file, shard.sha256, f"student views shard {shard.index}"):
            if xxh3_file(digests.root / shard.file) != shard.xxh3:
                report.problems.append(
                    f"student views shard {shard.index}: {shard.file} does not match its xxh3"
                )
    missing = sorted(set(range(cache.num_shards)) - {s.index for s in sv.shards})
    if missing:
        report.problems.append(f"student views: shard(s) {missing[:10]} not written; re-run `sak-cache run`")


def _check_names(root: Path, cache: CacheManifest, manifests: dict, report: Report) -> None:
    """Every file of the cache is one the format names and one its manifests record (the lock excepted)."""
    tars = {t.file for t in cache.images.shards}
    stores = {entry.path: manifests.get(fp) for fp, entry in cache.stores.items()}
    undigested: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] == "teachers" and len(parts) > 2:
            store_path, inner = "/".join(parts[:2]), "/".join(parts[2:])
            if store_path not in stores:
                report.problems.append(f"file {rel} belongs to no store listed in cache.json")
                continue
            m = stores[store_path]
            if store_file_kind(inner) is None:
                report.problems.append(
                    f"file {rel} is not a file of the cache format (a leftover? remove it)"
                )
            elif m is not None and inner != STORE_MANIFEST and not _recorded(m, inner):
                if m.files is None and store_file_kind(inner) not in ("zarr shard", "wds shard"):
                    undigested.append(rel)
                else:
                    report.problems.append(f"file {rel} is not recorded in its store's manifest")
            continue
        kind = cache_file_kind(rel)
        if kind is None:
            report.problems.append(f"file {rel} is not a file of the cache format (a leftover? remove it)")
        elif kind == "image tar" and rel not in tars:
            report.problems.append(f"file {rel} is not an image tar recorded in cache.json")
        elif kind == "student views shard" and rel not in {
            s.file for s in getattr(cache.student_views, "shards", [])
        }:
            report.problems.append(f"file {rel} is not a student views shard recorded in cache.json")
        elif kind == "student views metadata" and cache.student_views is None:
            report.problems.append(f"file {rel} belongs to student views cache.json does not record")
        elif kind == "image index" and cache.files is None:
            undigested.append(rel)
    if undigested:
        report.notes.append(
            f"{len(undigested)} file(s) named by the format carry no digest (written before sak-cache recorded "
            f"them; checked for readability only): {', '.join(undigested[:6])}{' ...' if len(undigested) > 6 else ''}"
        )


def _recorded(m: StoreManifest, rel: str) -> bool:
    return (m.files is not None and rel in m.files) or any(rel in s.files for s in m.shards)


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
    for s in ds.skipped[:20]:
        lines.append(f"  skipped {s.origin}: {s.reason}")
    header = f"{'teacher':<12} {'fingerprint':<26} {'levels':<14} {'shape (H,W,C)':<15} {'codec':<5} {'done':>9} {'bytes':>10} {'per view':>10}"
    lines += ["", header, "-" * len(header)]
    warnings = []
    for fp, entry in cache.stores.items():
        store_dir = Path(cache_dir) / entry.path
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
        lines += format_fidelity(m)
        if m.weights.random_init:
            warnings.append(
                f"WARNING: {entry.teacher} ({fp}) holds features of a RANDOM-INIT model "
                f"({m.weights.id}): not a real teacher, for tests only"
            )
    if not cache.stores:
        lines.append("(no teacher store yet)")
    return "\n".join(lines + ([""] + warnings if warnings else []))


def store_fidelity_warnings(cache_dir: str | Path) -> list[str]:
    """`run`'s warnings: every level of every store whose measured 1st-percentile cosine is under 0.99."""
    root = Path(cache_dir)
    lines = []
    for entry in read_cache(root).stores.values():
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


def records_problems(cache_dir: Path) -> list[str]:
    """The cheap part of `verify`: cache.json's own digest, and each store manifest against the sha256
    cache.json records for it (no shard is read)."""
    cache = read_cache(cache_dir)
    problems = []
    if cache.content_sha256 is not None and cache_content_digest(cache) != cache.content_sha256:
        problems.append(f"{CACHE_FILE} was modified after it was written")
    for fp, entry in cache.stores.items():
        path = cache_dir / entry.path / STORE_MANIFEST
        if entry.manifest_sha256 and (not path.is_file() or sha256_file(path) != entry.manifest_sha256):
            problems.append(f"store {fp}: its manifest does not match the sha256 in {CACHE_FILE}")
    return problems


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
        for entry in cache.stores.values():
            flag = "" if entry.complete else "(incomplete)"
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


# ---------------------------------------------------------------------------------- stage-2 caches


def check_stage2(root: Path) -> Report:
    """A stage-2 target cache: views table digest and rows, every teacher's shard files against the
    sha256 its cache.json records, every shard present, journal agreement; unnamed files reported."""
    from sak.pipeline.format.journal import read_journal
    from sak.pipeline.format.layout import JOURNAL

    cache = read_stage2_cache(root / CACHE_FILE)
    report = Report()
    if not cache.complete or cache.teachers is None:
        report.problems.append(
            f"{CACHE_FILE}: the cache is incomplete; re-run `sak-cache stage2` to finish it"
        )
        return report
    digests = _Digests(root, report.problems)
    if cache.views_sha256 is None:
        report.notes.append(f"{cache.views} has no recorded sha256 (written before views_sha256 existed)")
    elif digests.check(cache.views, cache.views_sha256, "views table"):
        n = _rows(root / cache.views, report.problems)
        if n is not None and n != cache.rows:
            report.problems.append(f"views table: {n} rows, cache.json says {cache.rows}")
    named = {CACHE_FILE, cache.views, ".sak-lock"}
    for t in cache.teachers:
        if sorted(int(s) for s in t.shards) != list(range(cache.num_shards)):
            report.problems.append(
                f"teacher {t.teacher}: {len(t.shards)} of {cache.num_shards} shards recorded"
            )
        for shard, files in t.shards.items():
            for rel, digest in files.items():
                digests.check(f"{t.path}/{rel}", digest, f"teacher {t.teacher} shard {shard}")
                named.add(f"{t.path}/{rel}")
        journal = read_journal(root / t.path) if (root / t.path / JOURNAL).exists() else {}
        if sorted(journal) != list(range(cache.num_shards)):
            report.problems.append(
                f"teacher {t.teacher}: journal {t.path}/{JOURNAL} lists {len(journal)} shards"
            )
        meta = sorted(p.relative_to(root).as_posix() for p in (root / t.path).rglob("zarr.json"))
        named.update(meta)
        named.add(f"{t.path}/{JOURNAL}")
        report.notes.append(f"teacher {t.teacher}: Zarr metadata and the journal are not digested")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in named:
            report.problems.append(f"file {rel} is not part of the stage-2 cache format (leftover or stray)")
    return report


def describe_stage2(root: Path, shown: str | None = None, sizes: dict[str, int] | None = None) -> str:
    """A bucket's stage-2 cache: root mirrors its metadata, `shown` is its URL, `sizes` its objects' bytes."""
    cache = read_stage2_cache(root / CACHE_FILE)
    i = cache.identity
    lines = [
        f"stage-2 cache {shown or root}  (written by {cache.code_version}{'' if cache.complete else ', INCOMPLETE'})",
        f"data     {i.dataset} {i.split}: {i.num_images} images x {cache.epochs} epochs = {cache.rows} rows, "
        f"crop {i.crop[0]}x{i.crop[1]}, seed {i.seed}, scale {i.scale_range}, photometric {i.photometric}",
        f"teachers {'stage-1 run ' + cache.init if cache.init else 'by name'}; codec {cache.codec}, "
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


# ------------------------------------------------------------------------------------- caches in buckets


def check_bucket_cache(url: str, progress=None) -> Report:
    """`verify` of a cache at a URL: every object downloaded once into a fresh temporary folder (so no
    earlier local copy can hide a damaged object), then checked as a local cache."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="sak-verify-"))
    try:
        pull(Bucket(url), tmp, bulk=True)
        if not (tmp / CACHE_FILE).is_file():
            raise SakError(f"{url} holds no {CACHE_FILE}; pass the URL of a cache (see `sak-cache ls`)")
        return check_cache(tmp, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
