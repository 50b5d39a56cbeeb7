"""`sak-cache verify`: check a cache (or a stage-2 target cache) against its manifests, byte for byte.

verify recomputes every digest the format records (format/records.py): cache.json's own content digest, image
tars, images/index.parquet, views.parquet, every store manifest, and every file of every teacher store
(shards, Zarr metadata, layout, journal, statistics); it checks the counts and that all stores describe
the same views in the same order (views.parquet digest, dataset fingerprint, view count, shard
boundaries), and reports any file in the cache the format does not name. Each problem names the file.
A store a live `sak-cache run` is adding (listed incomplete while the cache's lock is held) is reported
as in progress, naming the holder, and left unchecked: its manifest is written when that run ends.
A v1 cache written before the `files` tables existed verifies what it records; the files it names but
does not digest are listed as notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE
from sak.pipeline.base.provenance import sha256_file, stable_hash, xxh3_file
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import pull
from sak.pipeline.format.documents import (
    cache_content_digest,
    is_stage2_cache,
    read_cache,
    read_stage2_cache,
    read_store_manifest,
    stores_in_progress,
)
from sak.pipeline.format.layout import (
    CACHE_FILE,
    IMAGE_INDEX_FILE,
    STORE_MANIFEST,
    TEACHERS_DIR,
    cache_file_kind,
    store_file_kind,
)
from sak.pipeline.format.records import CacheManifest, StoreEntry, StoreManifest


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each fails verify
    notes: list[str] = field(default_factory=list)  # facts worth knowing that do not
    in_progress: list[str] = field(default_factory=list)  # stores a live run is adding: not checked


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
    manifests, busy = {}, stores_in_progress(root, cache)
    for fp, entry in cache.stores.items():
        if fp in busy:  # its manifest is written when that run ends: checked then, not damage now
            report.in_progress.append(f"store {entry.teacher} ({fp}): in progress ({busy[fp]}); not verified")
            continue
        manifests[fp] = _verify_store(root, cache, fp, entry, digests, report.problems, progress)
    _check_names(root, cache, manifests, report, {cache.stores[fp].path for fp in busy})
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
    from sak.pipeline.store.backends import store_codec
    from sak.pipeline.store.wds import WdsTeacherStore

    store = WdsTeacherStore(store_dir, store_codec(m), m.shard_size)
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


def _check_names(root: Path, cache: CacheManifest, manifests: dict, report: Report, busy: set[str]) -> None:
    """Every file of the cache is one the format names and one its manifests record (the lock excepted;
    the stores in `busy`, being written by a live run, are left alone)."""
    tars = {t.file for t in cache.images.shards}
    stores = {entry.path: manifests.get(fp) for fp, entry in cache.stores.items()}
    undigested: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] == TEACHERS_DIR and len(parts) > 2:
            store_path, inner = "/".join(parts[:2]), "/".join(parts[2:])
            if store_path in busy:
                continue
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


def records_problems(cache_dir: Path) -> list[str]:
    """The cheap part of `verify`: cache.json's own digest, and each store manifest against the sha256
    cache.json records for it (no shard is read)."""
    cache = read_cache(cache_dir)
    problems, busy = [], stores_in_progress(cache_dir, cache)
    if cache.content_sha256 is not None and cache_content_digest(cache) != cache.content_sha256:
        problems.append(f"{CACHE_FILE} was modified after it was written")
    for fp, entry in cache.stores.items():
        if fp in busy:
            continue
        path = cache_dir / entry.path / STORE_MANIFEST
        if entry.manifest_sha256 and (not path.is_file() or sha256_file(path) != entry.manifest_sha256):
            problems.append(f"store {fp}: its manifest does not match the sha256 in {CACHE_FILE}")
    return problems


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
    named = {CACHE_FILE, cache.views, LOCK_FILE}
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
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in named:
            report.problems.append(f"file {rel} is not part of the stage-2 cache format (leftover or stray)")
    return report


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
