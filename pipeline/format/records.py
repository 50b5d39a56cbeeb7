"""The cache format v1 as typed records: the one definition every writer and reader goes through.

Each record is a frozen dataclass; `to_json` / `from_json` (base/typed_json.py) convert it by its fields
and type hints, and the JSON Schema shipped in the package (schema/cache-v1.schema.json, `make schema`) is
generated from the same hints (schema.py), so other teams validate caches with any JSON Schema tool.
Where each document lives: layout.py; how documents are read and written: documents.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sak.pipeline.base.typed_json import OMIT, doc, omit_with
from sak.pipeline.sources.views import ViewPlan


@dataclass(frozen=True, kw_only=True)
class FileDigest:
    """Digest of one file of the cache."""

    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class SkippedInput:
    key: str
    origin: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class IngestRecord:
    """The options that chose which source images a cache holds (a later run must agree with them)."""

    limit: int | None
    min_image_side: int
    max_pixels: int
    max_decode_ratio: float | None = field(
        default=None, metadata=doc("--max-decode-ratio; absent in caches from before it existed", **OMIT)
    )


@dataclass(frozen=True, kw_only=True)
class DatasetRecord:
    source: str
    fingerprint: str = field(metadata=doc("hash of the (key, sha256) of every image of the index"))
    num_images: int
    num_inputs: int
    skipped: list[SkippedInput]
    ingest: IngestRecord | None = field(
        default=None, metadata=doc("the ingest options (--limit, ...); absent in older caches", **OMIT)
    )
    exif_oriented: int | None = field(
        default=None,
        metadata=doc(
            "images whose EXIF orientation tag is not 1: their stored pixels are used, never rotated; "
            "absent in older caches",
            **OMIT,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ImageTar:
    index: int
    file: str
    count: int
    bytes: int
    sha256: str
    xxh3: str | None = field(
        default=None,
        metadata=doc("xxh3-128 of the tar (the loader's fast check); absent in older caches", **OMIT),
    )


@dataclass(frozen=True, kw_only=True)
class ImagesRecord:
    index: str
    shards: list[ImageTar]


@dataclass(frozen=True, kw_only=True)
class FileRef:
    file: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class StoreEntry:
    """A store as cache.json lists it."""

    teacher: str
    path: str
    format: str
    codec: str
    complete: bool
    random_init: bool
    manifest_sha256: str | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class StudentViewsShard:
    """One shard file of the stored student views."""

    index: int
    file: str = field(metadata=doc("path relative to the cache"))
    sha256: str
    xxh3: str


@dataclass(frozen=True, kw_only=True)
class StudentViewsRecord:
    """`sak-cache run --student-views raw`: every view as the student sees it, so the loader neither
    decodes JPEGs nor resizes. A Zarr v3 array (views, S, S, 3) uint8, RGB, one view per inner chunk,
    `shard_size` views per shard file, no compression; cut from the stored image by views.cut_view."""

    array: str = field(metadata=doc("Zarr array folder, relative to the cache"))
    size: int = field(metadata=doc("S: the student input side (= the view plan's size)"))
    shape: list[int]
    dtype: Literal["uint8"] = "uint8"
    cut: str = field(metadata=doc("how the pixels were made"))
    metadata: FileDigest = field(metadata=doc("digest of the array's zarr.json"))
    shards: list[StudentViewsShard]


@dataclass(frozen=True, kw_only=True)
class CacheManifest:
    """cache.json: the dataset part of a cache and its stores."""

    schema_version: int
    kind: Literal["sak-cache"] = "sak-cache"
    created: str
    code_version: str
    dataset: DatasetRecord
    view_plan: ViewPlan
    shard_size: int
    num_views: int
    num_shards: int
    images: ImagesRecord
    views: FileRef
    stores: dict[str, StoreEntry]
    files: dict[str, FileDigest] | None = field(
        default=None,
        metadata=doc("top-level files (the tables) -> digest; absent in older v1 caches", **OMIT),
    )
    student_views: StudentViewsRecord | None = field(
        default=None, metadata=doc("views stored as student input pixels (--student-views raw)", **OMIT)
    )
    content_sha256: str | None = field(
        default=None,
        metadata=doc(
            "sha256 of this document's canonical JSON without this field (sorted keys, ',' ':')", **OMIT
        ),
    )


@dataclass(frozen=True, kw_only=True)
class TeacherRecord:
    name: str
    family: str
    timm_name: str
    pretrained_tag: str | None
    depth: int
    dim: int
    patch_size: int
    tiny: bool


@dataclass(frozen=True, kw_only=True)
class WeightsRecord:
    source: Literal["random", "file", "pretrained"]
    id: str
    path: str | None = field(default=None, metadata=OMIT)
    random_init: bool


@dataclass(frozen=True, kw_only=True)
class CodecValues:
    dtype: str
    means: str


@dataclass(frozen=True, kw_only=True)
class CodecScales:
    dtype: str
    granularity: str
    group: int | None
    qmax: float
    dequantize: str


@dataclass(frozen=True, kw_only=True)
class CodecLowRank:
    """pca<k> codecs: the values are k coefficients per token over a per-level basis (lowrank.py)."""

    rank: int = field(metadata=doc("k asked for; a level of C < k channels stores C"))
    fit: str
    decode: str


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """How stored values decode (codecs.py `Codec.describe`)."""

    name: str
    values: CodecValues
    scales: CodecScales | None = field(default=None, metadata=OMIT)
    low_rank: CodecLowRank | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    resize: str
    normalization: str
    mean: list[float]
    std: list[float]
    pad: str | None


@dataclass(frozen=True, kw_only=True)
class StoreIdentity:
    """Everything that determines a store's bytes; the store fingerprint is a hash of its JSON."""

    schema_version: int
    teacher: str
    timm_name: str
    pretrained_tag: str | None
    model_kwargs: dict[str, Any]
    weights: str
    input_size: list[int]
    view_size: int
    preprocessing: Preprocessing
    levels: list[int]
    token_selection: str
    grid: list[int]
    codec: str
    codec_spec: CodecSpec | None = field(default=None, metadata=OMIT)  # scaled codecs only
    dtype: str
    format: str
    compressor: str | None = field(
        default=None,
        metadata=doc(
            "Blosc compressor of the chunks: none | lz4 | zstd; absent: zstd (older caches)", **OMIT
        ),
    )
    dataset_fingerprint: str
    view_plan: ViewPlan
    grid_mode: str | None = field(default=None, metadata=OMIT)  # off the native grid only
    resample: str | None = field(default=None, metadata=omit_with("grid_mode"))


@dataclass(frozen=True, kw_only=True)
class LevelBasis:
    """A pca<k> level's basis, stored beside its arrays: x = coefficients @ components + mean."""

    mean: str = field(metadata=doc("Zarr array basis/<block>/mean or WebDataset file basis/<block>.mean.npy"))
    components: str = field(metadata=doc("basis/<block>/components or basis/<block>.components.npy"))
    mean_shape: list[int] = field(metadata=doc("(C,)"))
    components_shape: list[int] = field(metadata=doc("(k, C): orthonormal rows, largest variance first"))
    dtype: str
    decode: str


@dataclass(frozen=True, kw_only=True)
class LevelRecord:
    """One stored level: where its values (and scales) are, shapes and dtypes."""

    block: int
    array: str | None = field(default=None, metadata=OMIT)  # Zarr: levels/<block>
    member: str | None = field(default=None, metadata=OMIT)  # WebDataset: <samplekey>.<block>.npy
    shape: list[int]
    dtype: str
    store_dtype: str
    codec: str
    scales: str | None = field(default=None, metadata=OMIT)
    scales_member: str | None = field(default=None, metadata=OMIT)
    scales_shape: list[int] | None = field(default=None, metadata=OMIT)
    scales_dtype: str | None = field(default=None, metadata=OMIT)
    channels: int | None = field(
        default=None,
        metadata=doc("pca<k> stores: the decoded width C (shape[-1] is the stored width k)", **OMIT),
    )
    basis: LevelBasis | None = field(default=None, metadata=OMIT)  # pca<k> stores only


@dataclass(frozen=True, kw_only=True)
class ExtractRecord:
    """The `sak-cache run` configuration a store was made with (extract.ExtractConfig, as recorded)."""

    source: str | None
    out: str
    teachers: list[str]
    views_per_image: int
    size: int
    shard_size: int | None
    batch_size: int
    limit: int | None
    address: str | None
    weights: dict[str, str]
    random_init: bool
    seed: int
    normalization: str
    codec: str
    format: str
    student_views: str | None = field(default=None, metadata=OMIT)
    compressor: str | None = field(default=None, metadata=OMIT)
    levels: str
    grid: str
    workers: int | None
    object_store_mb: int
    min_image_side: int
    max_pixels: int
    max_decode_ratio: float | None = field(default=None, metadata=OMIT)
    progress: bool


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    index: int
    start: int
    stop: int
    samples: int
    files: dict[str, str] = field(metadata=doc("shard file (relative to the store) -> sha256"))
    xxh3: dict[str, str] | None = field(
        default=None,
        metadata=doc(
            "shard file -> xxh3-128, checked by the loader before first use; absent in older caches", **OMIT
        ),
    )


@dataclass(frozen=True, kw_only=True)
class LevelStats:
    block: int
    mean: list[float]
    std: list[float]


@dataclass(frozen=True, kw_only=True)
class Throughput:
    views_this_run: int
    seconds_this_run: float
    views_per_s: float | None
    steady_views_per_s: float | None
    actor_peak_rss_bytes: int | None = field(
        default=None, metadata=doc("the largest peak host memory of a teacher actor this run", **OMIT)
    )


@dataclass(frozen=True, kw_only=True)
class StoreManifest:
    """teachers/<fingerprint>/manifest.json: one teacher store."""

    schema_version: int
    kind: Literal["sak-teacher-store"] = "sak-teacher-store"
    fingerprint: str
    teacher: TeacherRecord
    weights: WeightsRecord
    random_init: bool
    identity: StoreIdentity
    format: Literal["zarr", "wds"]
    codec: str
    codec_spec: CodecSpec
    num_views: int
    shard_size: int
    levels: list[LevelRecord]
    views_sha256: str
    dataset_fingerprint: str
    view_plan: ViewPlan
    skipped_inputs: list[SkippedInput]
    created: str
    code_version: str
    config: ExtractRecord
    shards: list[ShardEntry]
    complete: bool
    stats: list[LevelStats]
    throughput: Throughput
    updated: str
    files: dict[str, FileDigest] | None = field(
        default=None,
        metadata=doc(
            "every file of the store but this manifest -> digest; absent in older v1 caches", **OMIT
        ),
    )
    fidelity: list[LevelFidelity] | None = field(
        default=None,
        metadata=doc(
            "per level: stored targets vs the float32 values before encoding, on the first shard (pca<k>: the "
            "second, held out from the basis fit); only for "
            "lossy stores (a codec other than fp32/fp16/bf16, or a resampled grid)",
            **OMIT,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class LevelFidelity:
    """Stored targets against the float32 values before encoding (fidelity.py), one level, measured at
    extraction on the first shard. Cosines are per token; "std" figures after standardising every channel
    with the reference's own mean and std (raw figures are dominated by the few massive channels)."""

    block: int
    compared: str = field(metadata=doc("codec | grid | codec+grid: what was lossy in this store"))
    tokens: int
    cos_mean: float
    cos_p1: float
    rel_l2: float
    std_cos_mean: float
    std_cos_p1: float
    std_rel_l2: float


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One line of a store's journal (shards.jsonl): a finished shard and its files' sha256."""

    shard: int
    start: int
    stop: int
    files: dict[str, str]
    seconds: float = 0.0
    xxh3: dict[str, str] | None = field(default=None, metadata=OMIT)
    fidelity: list[LevelFidelity] | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class Stage2Identity:
    dataset: str
    split: str
    num_images: int
    names_sha: str
    seed: int
    crop: list[int]
    scale_range: list[float]
    photometric: bool
    plan_version: int
    fingerprints: list[str]


@dataclass(frozen=True, kw_only=True)
class Stage2Teacher:
    teacher: str
    stage1_fingerprint: str
    path: str
    blocks: list[int]
    positions: list[int]
    grids: list[list[int]]
    shards: dict[str, dict[str, str]] = field(metadata=doc("shard index -> {file: sha256}"))
    weights: WeightsRecord | None = field(default=None, metadata=OMIT)  # by name: given; --init: stage 1's
    seed: int | None = field(default=None, metadata=OMIT)  # their random-init seed


@dataclass(frozen=True, kw_only=True)
class Stage2Cache:
    """cache.json of a stage-2 target cache (`sak-cache stage2`)."""

    kind: Literal["sak-stage2-cache"] = "sak-stage2-cache"
    identity: Stage2Identity
    data_root: str
    init: str | None = field(default=None, metadata=doc("the stage-1 run; absent: teachers by name", **OMIT))
    epochs: int
    rows: int
    codec: str
    shard_size: int
    num_shards: int
    views: str
    complete: bool
    code_version: str
    created: str
    teachers: list[Stage2Teacher] | None = field(default=None, metadata=OMIT)  # when complete
    views_sha256: str | None = field(default=None, metadata=OMIT)  # when complete
    seconds: float | None = field(default=None, metadata=OMIT)
    finished: str | None = field(default=None, metadata=OMIT)


DOCUMENTS = (CacheManifest, StoreManifest, ShardRecord, Stage2Cache)  # the schema's top-level records
