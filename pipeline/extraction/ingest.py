"""Ingest: source images -> `images/` tar shards, `images/index.parquet`, `views.parquet`, `cache.json`.

Runs once per cache; every later teacher store reuses it. Ray tasks each take a chunk of source items,
validate every image (a cheap full decode: JPEG at 1/8 scale still reads every byte, so truncation shows),
and write the valid ones' bytes, exactly as read, into one tar (`<key>.<ext>` members, stock WebDataset
layout) under a temporary name, renamed when complete. Invalid inputs are recorded with their reason.
The driver then draws the view plan and writes the tables. Source images are read once; from here on
everything reads the cache, so the source may move away.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sak.pipeline.base.errors import BadImage, SakError
from sak.pipeline.base.oserrors import writing
from sak.pipeline.base.provenance import (
    SCHEMA_VERSION,
    atomic_path,
    code_version,
    now_iso,
    sha256_bytes,
    sha256_file,
    stable_hash,
    xxh3_file,
)
from sak.pipeline.buckets.bucket import Bucket, is_url
from sak.pipeline.buckets.mirror import node_role, stage_dir
from sak.pipeline.extraction.runtime import Progress, log
from sak.pipeline.format.documents import write_cache
from sak.pipeline.format.layout import IMAGE_INDEX_FILE, VIEWS_FILE, image_tar_name
from sak.pipeline.format.records import (
    CacheManifest,
    DatasetRecord,
    FileDigest,
    FileRef,
    ImagesRecord,
    ImageTar,
    IngestRecord,
    SkippedInput,
)
from sak.pipeline.format.tables import IMAGE_INDEX_SCHEMA, VIEWS_SCHEMA
from sak.pipeline.sources.images import check_image
from sak.pipeline.sources.items import unsupported_reason
from sak.pipeline.sources.limits import ImageLimits
from sak.pipeline.sources.listing import SourceItem, list_source, read_bytes
from sak.pipeline.sources.views import ViewPlan


@dataclass(frozen=True)
class IndexRow:
    """One row of images/index.parquet (IMAGE_INDEX_SCHEMA, same names and order)."""

    key: str
    ext: str
    width: int
    height: int
    image_shard: int
    offset: int  # of the image's bytes in its tar
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class TarResult:
    """What one ingest task returns: the index rows of the images it kept, those it skipped, its tar."""

    rows: list[IndexRow]
    skipped: list[SkippedInput]
    tar: ImageTar | None  # None: no valid image in the chunk, no tar
    exif_oriented: int = 0  # kept images whose EXIF orientation tag is not 1 (stored pixels are used)


def write_image_tar(cache_dir: str, shard: int, items: list[SourceItem], limits: ImageLimits) -> TarResult:
    """Validate a chunk of source images and write the good ones to one tar. Returns index rows and
    skipped inputs. Runs as a Ray task; idempotent (the whole tar is rewritten). A URL cache_dir: the tar
    is written in this node's mirror, then uploaded as one object and checked before the task returns."""
    if is_url(cache_dir):
        local = stage_dir(cache_dir, node_role())
        (local / "images").mkdir(parents=True, exist_ok=True)
        result = write_image_tar(str(local), shard, items, limits)
        if result.tar is not None:
            Bucket(cache_dir).put_whole(local / result.tar.file, result.tar.file)
        return result
    final = Path(cache_dir) / image_tar_name(shard)
    tmp = final.with_name(final.name + ".tmp")
    readable, unsupported = [], []
    for it in items:
        reason = unsupported_reason(it.ext)
        if reason:
            unsupported.append(SkippedInput(key=it.key, origin=it.origin, reason=reason))
        else:
            readable.append(it)
    try:
        with writing(final):
            rows, skipped, oriented = _write_tar(tmp, shard, readable, limits)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing partial stays (a full disk, a read-only folder)
        raise
    if rows:
        os.replace(tmp, final)
        tar_record = ImageTar(
            index=shard,
            file=image_tar_name(shard),
            count=len(rows),
            bytes=final.stat().st_size,
            sha256=sha256_file(final),
            xxh3=xxh3_file(final),
        )
    else:  # nothing valid in this chunk: no tar at all
        tmp.unlink()
        tar_record = None
    return TarResult(rows, unsupported + skipped, tar_record, oriented)


def _write_tar(
    tmp: Path, shard: int, items: list[SourceItem], limits: ImageLimits
) -> tuple[list[IndexRow], list[SkippedInput], int]:
    """The good images of `items` into the tar `tmp`, fsynced: (their index rows, the skipped inputs, how
    many kept images carry an EXIF orientation tag)."""
    rows, skipped, oriented = [], [], 0
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item, data in read_bytes(items):
            try:
                info = check_image(data, min_side=limits.min_side, max_pixels=limits.max_pixels,
                                   max_decode_ratio=limits.max_decode_ratio)  # fmt: skip
            except BadImage as e:
                skipped.append(SkippedInput(key=item.key, origin=item.origin, reason=str(e)))
                continue
            oriented += info.orientation != 1
            member = tarfile.TarInfo(f"{item.key}.{item.ext}")
            member.size, member.mode, member.mtime = len(data), 0o644, 0
            tar.addfile(member, io.BytesIO(data))
            offset = tar.offset - 512 * ((len(data) + 511) // 512)  # data starts right after its header(s)
            rows.append(
                IndexRow(
                    key=item.key,
                    ext=item.ext,
                    width=info.width,
                    height=info.height,
                    image_shard=shard,
                    offset=offset,
                    nbytes=len(data),
                    sha256=sha256_bytes(data),
                )
            )
        tar.close()
        f.flush()
        os.fsync(f.fileno())
    return rows, skipped, oriented


def ingest(
    source: str,
    cache_dir: Path,
    plan: ViewPlan,
    shard_size: int,
    *,
    limit: int | None,
    limits: ImageLimits,
    progress: bool = True,
    url: str | None = None,
) -> CacheManifest:
    """Build the dataset part of a new cache and return its `cache.json` content (also written). With a
    URL, cache_dir is the driver's mirror: the image tars go to the bucket from the tasks that write them."""
    import ray

    items = list_source(source)
    if limit is not None:
        items = items[:limit]
    (cache_dir / "images").mkdir(parents=True, exist_ok=True)
    per_tar = max(1, shard_size // plan.views_per_image)
    chunks = [items[i : i + per_tar] for i in range(0, len(items), per_tar)]
    task = ray.remote(num_cpus=1)(write_image_tar)
    max_in_flight = 2 * max(1, int(ray.available_resources().get("CPU", 1)))
    bar = Progress(len(items), "images", "ingest", enabled=progress)
    results: dict[int, TarResult] = {}
    pending: dict = {}
    next_chunk = 0
    while next_chunk < len(chunks) or pending:
        while next_chunk < len(chunks) and len(pending) < max_in_flight:  # backpressure
            ref = task.remote(url or str(cache_dir), next_chunk, chunks[next_chunk], limits)
            pending[ref] = next_chunk
            next_chunk += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            idx = pending.pop(ref)
            results[idx] = ray.get(ref)
            bar.update(len(chunks[idx]))
    bar.close()

    index_rows = [r for i in range(len(chunks)) for r in results[i].rows]
    skipped = [s for i in range(len(chunks)) for s in results[i].skipped]
    tars = [results[i].tar for i in range(len(chunks)) if results[i].tar]
    if not index_rows:
        raise SakError(
            f"no usable image in {source} ({len(skipped)} skipped, e.g. {skipped[0].origin}: "
            f"{skipped[0].reason})"
            if skipped
            else f"no image in {source}"
        )
    for s in skipped:
        log.warning(f"skipped {s.origin}: {s.reason}")
    oriented = sum(results[i].exif_oriented for i in range(len(chunks)))
    if oriented:
        log.warning(
            f"{oriented} images carry an EXIF orientation tag: their stored pixels are used, not rotated "
            f"(recorded in cache.json; see docs/extracting.md)"
        )

    view_rows = {name: [] for name in VIEWS_SCHEMA.names}
    for r in index_rows:
        for v in plan.views(r.key, r.width, r.height):
            for name, value in (
                ("key", v.key),
                ("view", v.view),
                ("x0", v.x0),
                ("y0", v.y0),
                ("x1", v.x1),
                ("y1", v.y1),
                ("flip", v.flip),
                ("image_shard", r.image_shard),
            ):
                view_rows[name].append(value)
    with atomic_path(cache_dir / VIEWS_FILE) as tmp:
        pq.write_table(pa.table(view_rows, schema=VIEWS_SCHEMA), tmp)
    index_table = pa.Table.from_pylist([dataclasses.asdict(r) for r in index_rows], schema=IMAGE_INDEX_SCHEMA)
    with atomic_path(cache_dir / IMAGE_INDEX_FILE) as tmp:
        pq.write_table(index_table, tmp)

    num_views = len(index_rows) * plan.views_per_image
    dataset_fp = stable_hash([(r.key, r.sha256) for r in index_rows], 16)
    tables = {rel: FileDigest(sha256=sha256_file(cache_dir / rel), bytes=(cache_dir / rel).stat().st_size)
              for rel in (IMAGE_INDEX_FILE, VIEWS_FILE)}  # fmt: skip
    cache = CacheManifest(
        schema_version=SCHEMA_VERSION,
        created=now_iso(),
        code_version=code_version(),
        dataset=DatasetRecord(
            source=str(source),
            fingerprint=dataset_fp,
            num_images=len(index_rows),
            num_inputs=len(items),
            skipped=skipped,
            ingest=IngestRecord(
                limit=limit,
                min_image_side=limits.min_side,
                max_pixels=limits.max_pixels,
                max_decode_ratio=limits.max_decode_ratio,
            ),
            exif_oriented=oriented,
        ),
        view_plan=plan,
        shard_size=shard_size,
        num_views=num_views,
        num_shards=-(-num_views // shard_size),
        images=ImagesRecord(index=IMAGE_INDEX_FILE, shards=tars),
        views=FileRef(file=VIEWS_FILE, sha256=tables[VIEWS_FILE].sha256),
        stores={},
        files=tables,
    )
    cache = write_cache(cache_dir, cache)
    log.info(
        f"ingested {len(index_rows)} images ({len(skipped)} skipped) -> {num_views} views in "
        f"{cache.num_shards} shards"
    )
    return cache
