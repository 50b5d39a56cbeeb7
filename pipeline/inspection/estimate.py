"""`sak-cache estimate`: bytes, GPU-hours and read bandwidth of a cache, before anyone spends them.

Bytes per view per teacher = sum over kept levels of H * W * (C * value bytes + scales), from the teacher's
grid at the view size (or the `--grid` it is resampled to), its width, the codec; divided by the lossless
Blosc factor the store gets on top (ASSUMED_COMPRESSION, measured by bench/codecs.py; override with
`--compression`). WebDataset tars are not compressed and add ~1 KB of tar and .npy headers per member.

Compute = multiply-accumulates (MACs) of the teacher forward, counted from the architecture at the model's
input size, up to the deepest kept block (extraction stops there):
  patch embed        N_patch * 3 p^2 C
  linear layers      qkv + proj 4 N' C^2, MLP 2 r N C^2 (r = 4). N' = N, except SAM's windowed blocks, whose
                     qkv/proj run on the window-padded grid (64 -> 70 with window 14)
  attention matmuls  Q K^T and A V: 2 T^2 C per window of T tokens (one window = all N tokens when global),
                     plus SAM's decomposed relative positions, T (h + w) C per window
The usual published figures, DINOv2-L 221G, CLIP-L 221G, SAM-L 1308G MACs per 384 view, equal the
patch-embed + linear part exactly (220.9G, 220.9G, 1307.6G); the attention matmuls add 12-14% on top
(26G, 26G, 182G). GPU-hours use the full count: 2 FLOP per MAC / (peak bf16 FLOP/s * utilization).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.units import UNITS_NOTE, human_bytes
from sak.pipeline.extraction.config import DEFAULT_SHARD_VIEWS
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.targets import (
    GridChoice,
    as_codec,
    as_grid,
    codec_field,
    compressor_field,
    format_field,
    grid_field,
    levels_field,
    student_views_field,
    target_shape,
)
from sak.pipeline.teachers.specs import TeacherSpec, parse_teachers

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
GPU_PEAK_BF16_TFLOPS: dict[str, float] = {
    "h100": 989.4,  # H100 SXM5
    "h100_pcie": 756.0,
    "h200": 989.4,  # same compute as H100 SXM, more memory
    "b200": 2250.0,
    "a100": 312.0,  # SXM and PCIe
    "l40s": 362.1,
    "l4": 121.0,
    "a10": 125.0,
    "rtx4090": 165.2,  # fp32 accumulate
    "mi300x": 1307.4,
}

# Lossless Blosc-zstd factor on top of each codec's values (+scales), as the Zarr store writes them.
# Measured by bench/codecs.py on synthetic ViT-like outlier features (C 1024; the tiny random-init
# teachers agree within a few %). Real fp16 features are reported at ~1.1x: same ballpark. Without
# real teacher weights here, these are assumptions: pass --compression after measuring your own features.
ASSUMED_COMPRESSION: dict[str, float] = {
    "fp32": 1.10,
    "fp16": 1.08,
    "bf16": 1.15,
    "int8": 1.06,
    "int8_group32": 1.06,
    "int8_group128": 1.18,
    "int8_token": 1.5,
    "int8_channel": 1.3,
    "fp8": 1.19,
    "fp8_token": 1.17,
    "int8_tc": 1.15,  # x100-x1000 outliers: 1.005 raw -> 0.873 B/value (random-init L: 1.01)
}
# The training loader's cost per CPU core, measured by bench/loader.py (one core, page cache, the paper's
# target shapes; see the README table "Loader cost per core"). Per sample = image ms (the student input:
# decode + cut_view, or the stored raw pixels) + stored target MB / read rate + the fast integrity check
# (xxh3-128 over the same bytes, once per file per process). Re-measure on your own machine:
# `python bench/loader.py --json loader.json`; these are figures of the machine they were measured on.
LOADER_IMAGE_MS = {"decode": 5.3, "raw": 1.1}  # ms per 384 px view, normalised float32 included
LOADER_READ_MB_PER_S = {"none": 4300.0, "lz4": 2700.0, "zstd": 610.0}  # stored MB -> batch tensors (fp16)
LOADER_CHECK_MB_PER_S = 5170.0  # xxh3-128, page-cached (sha256: 1205)
ZARR_CHUNK_OVERHEAD = 32  # bytes per stored chunk: Blosc header 16 + shard index entry 16
WDS_MEMBER_OVERHEAD = 512 + 128 + 256  # tar header + .npy header + mean padding to 512
ASSUMED_IMAGE_KB = 110.0  # mean stored JPEG of ImageNet-1k train (~140 GB / 1.28M images)


@dataclass(frozen=True)
class EstimateConfig:
    """What `sak-cache estimate` takes: the options of `run` that decide the cache, plus the machine."""

    teachers: tuple[str, ...] = field(metadata={"help": "Comma list of teachers, as for `run`."})
    size: int = field(default=384, metadata={"help": "View side in pixels (SAM sees 1024)."})
    views_per_image: int = field(
        default=1, metadata={"help": "Views per image, as for `run` (1, the paper's)."}
    )
    codec: Codec = codec_field()
    levels: str = levels_field()
    grid: GridChoice = grid_field()
    format: str = format_field()
    source: str | None = field(
        default=None,
        metadata={"help": "Count the images (and their bytes) of this source, as `run --source` reads it."},
    )
    images: int | None = field(
        default=None, metadata={"help": "Number of images, when no --source is given."}
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N images, as for `run`."})
    gpu: str = field(
        default="h100",
        metadata={
            "help": "GPU kind for GPU-hours (peak bf16 table in estimate.py).",
            "parse": str.lower,
            "group": "machine",
        },
    )
    utilization: float = field(
        default=0.4, metadata={"help": "Achieved fraction of the GPU's bf16 peak.", "group": "machine"}
    )
    samples_per_s: float = field(
        default=1000.0, metadata={"help": "Student read rate (views/s, all GPUs).", "group": "machine"}
    )
    compression: float | None = field(
        default=None,
        metadata={"help": "Lossless factor on top of the codec [default: measured table]."},
    )
    image_kb: float = field(
        default=ASSUMED_IMAGE_KB, metadata={"help": "Mean stored image size without --source."}
    )
    compressor: str = compressor_field()
    student_views: str = student_views_field()
    read_gbps: float = field(
        default=10.0, metadata={"help": "Storage bandwidth the trainers share, GB/s.", "group": "machine"}
    )
    cores: int = field(default=12, metadata={"help": "Loader CPU cores per node.", "group": "machine"})
    batch_size: int = field(
        default=32, metadata={"help": "Views per teacher forward, as for `run` (CPU-only host memory)."}
    )
    shard_size: int | None = field(
        default=None,
        metadata={
            "help": "Views per shard, as for `run` [default: its default]; sets host memory per actor."
        },
    )

    def __post_init__(self) -> None:
        # a codec or grid named by a script or test (the CLI parses them itself) is resolved here, once
        object.__setattr__(self, "codec", as_codec(self.codec))
        object.__setattr__(self, "grid", as_grid(self.grid))


@dataclass
class TeacherEstimate:
    name: str
    blocks: tuple[int, ...]  # kept levels
    grid: tuple[int, int]  # stored (H, W)
    dim: int
    raw_bytes_per_view: int  # values + scales, before compression
    bytes_per_view: float  # on disk
    macs_linear: float  # per view, patch embed + linear layers
    macs_attention: float  # per view, attention matmuls (+ SAM relative positions)
    blocks_run: int  # transformer blocks the teacher runs: up to the deepest kept level (stop early)
    params: float = 0.0  # weights of the blocks it holds (from the spec: width, depth, MLP ratio)
    fp32_bytes_per_view: int = 0  # its kept levels as float32 on the store grid, before encoding
    input_bytes_per_view: int = 0  # the uint8 view at its input side (SAM: 1024)
    cpu_activation_bytes_per_view: float = 0.0  # its forward's peak activations on a CPU

    @property
    def macs(self) -> float:
        return self.macs_linear + self.macs_attention


@dataclass
class Estimate:
    config: EstimateConfig
    num_images: int
    num_views: int
    image_bytes: float
    compression: float
    teachers: list[TeacherEstimate] = field(default_factory=list)

    @property
    def target_bytes_per_view(self) -> float:
        return sum(t.bytes_per_view for t in self.teachers)

    @property
    def target_bytes(self) -> float:
        return self.target_bytes_per_view * self.num_views

    def gpu_hours(self, t: TeacherEstimate | None = None) -> float:
        macs = t.macs if t is not None else sum(x.macs for x in self.teachers)
        peak = GPU_PEAK_BF16_TFLOPS[self.config.gpu] * 1e12 * self.config.utilization
        return 2 * macs * self.num_views / peak / 3600

    @property
    def input_bytes_per_sample(self) -> float:
        """Bytes of the student input read per sample: the stored JPEG, or S*S*3 raw pixels."""
        if self.config.student_views == "raw":
            return self.config.size**2 * 3
        return self.image_bytes / max(self.num_images, 1)

    @property
    def student_view_bytes(self) -> float:
        """Bytes of the stored student views (`--student-views raw`), 0 without them."""
        return self.num_views * self.config.size**2 * 3 if self.config.student_views == "raw" else 0.0

    @property
    def read_bytes_per_sample(self) -> float:
        """Disk bytes one training sample reads: its targets plus its student input."""
        return self.target_bytes_per_view + self.input_bytes_per_sample

    def online_gpu_hours_per_epoch(self) -> float:
        """Teachers run online: one forward per trained sample, an epoch = one view of every image."""
        return self.gpu_hours() * self.num_images / max(self.num_views, 1)

    @property
    def break_even_epochs(self) -> float:
        """Epochs after which the cache's one-off teacher compute equals the online runs' (= views per
        image: the cache computes K views once, online training one view per image per epoch)."""
        return self.gpu_hours() / max(self.online_gpu_hours_per_epoch(), 1e-12)

    @property
    def loader_ms_per_sample(self) -> float:
        """One core's loader work per sample, from the per-core rates bench/loader.py measured."""
        mb = self.target_bytes_per_view / 1e6
        return (
            LOADER_IMAGE_MS[self.config.student_views]
            + 1e3 * mb / LOADER_READ_MB_PER_S[self.config.compressor]
            + 1e3 * mb / LOADER_CHECK_MB_PER_S
        )

    @property
    def shard_views(self) -> int:
        k, given = self.config.views_per_image, self.config.shard_size
        return given if given is not None else k * -(-DEFAULT_SHARD_VIEWS // k)

    def actor_host_memory(self) -> dict[str, float]:
        """Peak host memory of one teacher actor on a GPU node, by part (ACTOR_MEMORY_MODEL)."""
        views = self.shard_views
        parts = {
            "process": ACTOR_BASE_BYTES,
            "weights": 4.0 * sum(t.params for t in self.teachers),
            "targets": 2.0 * views * sum(t.fp32_bytes_per_view for t in self.teachers),
            "inputs": float(views * sum(t.input_bytes_per_view for t in self.teachers)),
        }
        total = sum(parts.values())
        per_view = max((t.cpu_activation_bytes_per_view for t in self.teachers), default=0.0)
        return {**parts, "total": total, "cpu_only_total": total + self.config.batch_size * per_view}

    def samples_per_s_fed(self) -> dict[str, float]:
        """What storage (--read-gbps) and loader cores (--cores) can feed, and the smaller of the two."""
        storage = self.config.read_gbps * 1e9 / self.read_bytes_per_sample
        cpu = self.config.cores * 1e3 / self.loader_ms_per_sample
        return {"storage": storage, "cpu": cpu, "fed": min(storage, cpu)}


# ---------------------------------------------------------------------------------- host memory

# What one teacher actor holds at its peak on a GPU node (where activations live on the device): the
# process (Python, torch, the Ray worker, a CUDA context), every teacher's float32 weights as loaded, one
# shard of views at each teacher's input side, and the shard's kept levels as float32 on the store grid,
# twice (the per-batch parts and their concatenation) before they are encoded and written. Measured actor
# peaks (manifest `throughput.actor_peak_rss_bytes`) come from CPU-only runs here: 1.2 GB for the three
# tiny teachers at 64 px (the model: 1.2 GB). On a CPU-only node the forward's activations of one
# --batch-size batch come on top (CPU_ACTIVATION_FACTOR): one sam_b view at 1024 px peaked 3.25 GB at
# batch 1 and 5.16 GB at batch 2 (1.9 GB a view: global attention over 4096 tokens), and dinov2_b + sam_b
# at 384 px, shard 4, batch 4 peaked 9.4 GB (the model: 2.4 GB + 4 x 1.9 GB = 10.1 GB). No GPU node has
# been measured yet: the GPU figure is the model's.
ACTOR_MEMORY_MODEL = "process 1.2 GB + fp32 weights + shard x (2 x fp32 targets + input views)"
ACTOR_BASE_BYTES = 1.2e9
CPU_ACTIVATION_FACTOR = 2.4  # x heads x tokens^2 x 4 bytes: attention scores, softmax, relative positions


def cpu_activation_bytes(spec: TeacherSpec, size: int) -> float:
    """Peak activations of one view through the teacher on a CPU, dominated by global attention's scores
    (heads = width / 64) over all tokens; the MLP's hidden states when attention is small."""
    n = (spec.model_input_side(size) // spec.patch_size) ** 2 + spec.prefix_tokens
    heads = max(1, spec.dim // 64)
    return CPU_ACTIVATION_FACTOR * heads * n * n * 4 + 4 * spec.mlp_ratio * n * spec.dim * 4


def teacher_params(spec: TeacherSpec, blocks_run: int) -> float:
    """Weights of the patch embedding and the first `blocks_run` transformer blocks."""
    c = spec.dim
    return 3 * spec.patch_size**2 * c + blocks_run * (4 + 2 * spec.mlp_ratio) * c * c


# -------------------------------------------------------------------------------------------- MACs


def teacher_macs(spec: TeacherSpec, size: int, blocks_run: int | None = None) -> tuple[float, float]:
    """(linear MACs, attention MACs) of one view through the first `blocks_run` blocks (default all), from
    the architecture its TeacherSpec describes (width, depth, patch, prefix tokens, MLP ratio, windows)."""
    c, p = spec.dim, spec.patch_size
    side = spec.model_input_side(size)
    gh = gw = side // p
    n_patch = gh * gw
    n = n_patch + spec.prefix_tokens
    blocks_run = spec.depth if blocks_run is None else blocks_run
    linear = n_patch * 3 * p * p * c  # patch embed (a p x p stride-p conv)
    attention = 0.0
    mlp = 2 * spec.mlp_ratio * c * c
    win = spec.attention_window
    for b in range(blocks_run):
        if win is None or b in spec.global_blocks:
            linear += n * (4 * c * c + mlp)
            attention += 2 * n * n * c  # QK^T, AV
            if win is not None:
                attention += n * (gh + gw) * c  # SAM's decomposed relative positions
        else:
            windows = math.ceil(gh / win) * math.ceil(gw / win)
            t = win * win
            linear += windows * t * 4 * c * c + n * mlp  # qkv/proj on the padded windows; MLP unpadded
            attention += windows * (2 * t * t * c + t * 2 * win * c)
    return float(linear), float(attention)


# ------------------------------------------------------------------------------------------- bytes


def stored_bytes_per_view(
    h: int, w: int, c: int, levels: int, codec: Codec, compression: float, fmt: str
) -> tuple[int, float]:
    """(raw, on-disk) bytes of one view of one teacher."""
    raw = levels * codec.bytes_per_sample(h, w, c)
    arrays = levels * (2 if codec.scaled else 1)  # chunks (Zarr) or members (WDS) per view
    if fmt == "wds":
        return raw, float(raw + arrays * WDS_MEMBER_OVERHEAD)
    if fmt != "zarr":
        raise SakError(f"unknown format {fmt!r}; known formats: wds, zarr")
    return raw, raw / compression + arrays * ZARR_CHUNK_OVERHEAD


def _count_source(source: str, limit: int | None) -> tuple[int, float]:
    """(images, stored bytes) of a source: image file sizes; for tar/parquet containers, each container's
    size shared evenly among its images (headers and other members included: a slight overcount)."""
    from sak.pipeline.sources.listing import list_source

    items = list_source(source)
    used = items[:limit] if limit is not None else items
    per_container: dict[str, int] = {}
    for it in items:
        per_container[it.locator[1]] = per_container.get(it.locator[1], 0) + 1
    nbytes = 0.0
    for it in used:
        path = it.locator[1]
        nbytes += os.stat(path).st_size / (1 if it.locator[0] == "file" else per_container[path])
    return len(used), nbytes


def estimate(cfg: EstimateConfig) -> Estimate:
    specs = parse_teachers(list(cfg.teachers))
    if cfg.gpu not in GPU_PEAK_BF16_TFLOPS:
        raise SakError(f"unknown --gpu {cfg.gpu!r}; known: {', '.join(sorted(GPU_PEAK_BF16_TFLOPS))}")
    if not 0 < cfg.utilization <= 1:
        raise SakError(f"--utilization must be in (0, 1], got {cfg.utilization}")
    if cfg.views_per_image < 1:
        raise SakError(f"--views-per-image must be >= 1, got {cfg.views_per_image}")
    if cfg.source:
        num_images, image_bytes = _count_source(cfg.source, cfg.limit)
    elif cfg.images:
        num_images = min(cfg.images, cfg.limit) if cfg.limit else cfg.images
        image_bytes = num_images * cfg.image_kb * 1000
    else:
        raise SakError("pass --source (to count its images) or --images N")
    if cfg.compressor not in LOADER_READ_MB_PER_S:
        raise SakError(f"unknown --compressor {cfg.compressor!r}; use one of none, lz4, zstd")
    if cfg.student_views not in LOADER_IMAGE_MS:
        raise SakError(f"unknown --student-views {cfg.student_views!r}; use one of decode, raw")
    if cfg.read_gbps <= 0 or cfg.cores < 1:
        raise SakError(f"--read-gbps must be > 0 and --cores >= 1, got {cfg.read_gbps} and {cfg.cores}")
    zstd = ASSUMED_COMPRESSION.get(cfg.codec.name, 1.0) if cfg.compressor == "zstd" else 1.0
    compression = cfg.compression or zstd
    est = Estimate(cfg, num_images, num_images * cfg.views_per_image, image_bytes, compression)
    for spec in specs:
        shape = target_shape(spec, cfg.size, cfg.levels, cfg.grid)
        blocks, (h, w) = shape.blocks, shape.grid
        raw, disk = stored_bytes_per_view(h, w, spec.dim, len(blocks), cfg.codec, compression, cfg.format)
        blocks_run = max(blocks) + 1  # forward_levels stops after the deepest kept block
        linear, attention = teacher_macs(spec, cfg.size, blocks_run)
        est.teachers.append(
            TeacherEstimate(
                spec.name, blocks, (h, w), spec.dim, raw, disk, linear, attention, blocks_run,
                params=teacher_params(spec, spec.depth),  # loaded whole, whatever it runs
                fp32_bytes_per_view=4 * len(blocks) * h * w * spec.dim,
                input_bytes_per_view=3 * spec.model_input_side(cfg.size) ** 2,
                cpu_activation_bytes_per_view=cpu_activation_bytes(spec, cfg.size),
            )
        )  # fmt: skip
    return est


# ------------------------------------------------------------------------------------------ report


def format_estimate(est: Estimate) -> str:
    """The readable table `sak-cache estimate` prints (sizes in decimal units, `units.human_bytes`)."""
    cfg = est.config
    lines = [
        f"estimate  {est.num_images:,} images x {cfg.views_per_image} view(s) = {est.num_views:,} views at "
        f"{cfg.size}px; codec {cfg.codec}, levels {cfg.levels}, grid {cfg.grid}, format {cfg.format}",
        f"          lossless factor {est.compression:.2f}x ({'given' if cfg.compression else 'assumed'}); "
        f"GPU {cfg.gpu} {GPU_PEAK_BF16_TFLOPS[cfg.gpu]:.0f} TFLOP/s bf16 peak x {cfg.utilization:.2f} utilization",
        "",
    ]
    header = (
        f"{'teacher':<12} {'levels':<13} {'grid':>7} {'C':>5} {'raw/view':>10} {'disk/view':>10} "
        f"{'total':>10} {'GMAC/view':>18} {'GPU-h':>9}"
    )
    lines += [header, "-" * len(header)]
    for t in est.teachers:
        blocks = ",".join(map(str, t.blocks))
        gmac = f"{t.macs / 1e9:.1f} ({t.macs_linear / 1e9:.0f}+{t.macs_attention / 1e9:.0f})"
        lines.append(
            f"{t.name:<12} {blocks:<13} {t.grid[0]:>3}x{t.grid[1]:<3} {t.dim:>5} {human_bytes(t.raw_bytes_per_view):>10} "
            f"{human_bytes(t.bytes_per_view):>10} {human_bytes(t.bytes_per_view * est.num_views):>10} {gmac:>18} "
            f"{est.gpu_hours(t):>9.2f}"
        )
    total_macs = sum(t.macs for t in est.teachers)
    lines += [
        "-" * len(header),
        f"{'all':<12} {'':<13} {'':>7} {'':>5} {human_bytes(sum(t.raw_bytes_per_view for t in est.teachers)):>10} "
        f"{human_bytes(est.target_bytes_per_view):>10} {human_bytes(est.target_bytes):>10} "
        f"{total_macs / 1e9:>18.1f} {est.gpu_hours():>9.2f}",
        "",
        f"teacher compute  {2 * total_macs / 1e12:.2f} TFLOP per view (GMAC = linear + attention; each "
        f"teacher runs blocks up to its deepest kept level: "
        f"{', '.join(f'{t.name} {t.blocks_run}' for t in est.teachers)})",
        f"sizes            {UNITS_NOTE}",
        f"images/          {human_bytes(est.image_bytes)} ({human_bytes(est.image_bytes / max(est.num_images, 1))} "
        f"per image, {'measured on the source' if cfg.source else 'assumed'})",
        f"cache total      {human_bytes(est.target_bytes + est.image_bytes + est.student_view_bytes)}"
        + (f" (student views {human_bytes(est.student_view_bytes)})" if est.student_view_bytes else ""),
        f"student reads    {cfg.samples_per_s:,.0f} samples/s x {human_bytes(est.read_bytes_per_sample)} = "
        f"{human_bytes(cfg.samples_per_s * est.read_bytes_per_sample)}/s "
        f"(targets {human_bytes(cfg.samples_per_s * est.target_bytes_per_view)}/s, "
        f"images {human_bytes(cfg.samples_per_s * (est.read_bytes_per_sample - est.target_bytes_per_view))}/s)",
        _host_memory_line(est),
        "",
        *_cache_or_online(est),
    ]
    return "\n".join(lines)


def _host_memory_line(est: Estimate) -> str:
    m = est.actor_host_memory()
    return (
        f"host memory      ~{human_bytes(m['total'])} per teacher actor on a GPU node ({human_bytes(m['process'])} "
        f"process + {human_bytes(m['weights'])} weights + {est.shard_views} views x "
        f"{human_bytes(m['targets'] / est.shard_views / 2)} fp32 targets x 2 + {human_bytes(m['inputs'])} "
        f"input views; --shard-size scales it; on a CPU-only node ~{human_bytes(m['cpu_only_total'])} at "
        f"--batch-size {est.config.batch_size}: the forward's activations; measured peaks: inspect)"
    )


def _cache_or_online(est: Estimate) -> list[str]:
    """Whether to cache at all, and what a node can feed."""
    cfg, fed = est.config, est.samples_per_s_fed()
    return [
        f"cache or online  online teachers: {est.online_gpu_hours_per_epoch():.2f} GPU-h per epoch of training; "
        f"the cache: {est.gpu_hours():.2f} GPU-h once + "
        f"{human_bytes(est.target_bytes + est.image_bytes + est.student_view_bytes)}; "
        f"break-even after {est.break_even_epochs:.1f} epochs (more epochs: the cache wins)",
        f"feeding          {cfg.read_gbps:g} GB/s of storage feeds {fed['storage']:,.0f} samples/s; {cfg.cores} "
        f"loader cores feed {fed['cpu']:,.0f} samples/s ({est.loader_ms_per_sample:.1f} ms per sample per core: "
        f"compressor {cfg.compressor}, student views {cfg.student_views}; per-core rates measured by "
        f"bench/loader.py, see LOADER_* in estimate.py) -> {fed['fed']:,.0f} samples/s",
    ]


def estimate_to_dict(est: Estimate) -> dict:
    """Machine-readable form (for --json and tests)."""
    from dataclasses import asdict

    return {
        "config": {**asdict(est.config), "codec": est.config.codec.name, "grid": str(est.config.grid)},
        "num_images": est.num_images,
        "num_views": est.num_views,
        "compression": est.compression,
        "image_bytes": est.image_bytes,
        "target_bytes": est.target_bytes,
        "gpu_hours": est.gpu_hours(),
        "read_bytes_per_s": est.config.samples_per_s * est.read_bytes_per_sample,
        "online_gpu_hours_per_epoch": est.online_gpu_hours_per_epoch(),
        "break_even_epochs": est.break_even_epochs,
        "loader_ms_per_sample_per_core": est.loader_ms_per_sample,
        "samples_per_s_fed": est.samples_per_s_fed(),
        "actor_host_memory_bytes": est.actor_host_memory(),
        "teachers": [
            {
                **asdict(t),
                "macs": t.macs,
                "bytes": t.bytes_per_view * est.num_views,
                "gpu_hours": est.gpu_hours(t),
            }
            for t in est.teachers
        ],
    }


def measured_store_bytes(store_dir: str | Path) -> int:
    """Bytes of a store's target files: Zarr shard files of levels/ and scales/ (not their zarr.json
    metadata), or WebDataset tars under shards/. Manifests, journal and statistics are not counted."""
    root = Path(store_dir)
    return sum(
        p.stat().st_size
        for d in ("levels", "scales", "shards")
        for p in (root / d).rglob("*")
        if p.is_file() and p.name != "zarr.json" and ".tmp" not in p.name
    )
