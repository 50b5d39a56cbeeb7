"""Pipeline efficiency of `sak-cache run`: full pipeline views/s against a bare teacher-forward loop.

    python bench/extract.py                                   # CPU: tiny teachers, procedural images
    python bench/extract.py --teachers dinov2_l,clip_l,sam_l --source /data/imgs --images 2048 --random-init

The pipeline figure is the steady-state rate of a real extraction (from the first finished shard to the
last, so actor start-up and teacher loading are excluded). The bare loop runs only the same teachers'
forward passes on pre-decoded uint8 views already in memory, with the same device, batch size and threads
per teacher actor. Their ratio is the pipeline efficiency (goal on a GPU: >= 0.9). MFU: the teachers' matmul
FLOPs per view (sak.pipeline.inspection.estimate's count, up to the deepest stored level) x views/s over the bf16
peak, the datasheet's (estimate.GPU_PEAK_BF16_TFLOPS) and one measured here by a large bf16 matmul.
Prints a table and the stored bytes per view per teacher; `--json OUT` writes the figures as each lands.
`--skip-without-cuda`: without CUDA, resolve the teachers and their FLOPs (the set-up), then record
`skipped: no CUDA`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from step_io import StepReport

from sak.pipeline.base.provenance import code_version
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.format.documents import read_cache, read_store_manifest
from sak.pipeline.inspection.estimate import GPU_PEAK_BF16_TFLOPS, teacher_macs
from sak.pipeline.sources.synthetic import write_photo_folder  # procedural photos, shared with the tests
from sak.pipeline.teachers.forward import load_teacher
from sak.pipeline.teachers.specs import get_teacher
from sak.pipeline.teachers.weights import WeightsChoice


def make_images(folder: Path, n: int) -> None:
    write_photo_folder(folder, n)


def bare_loop(
    teachers: list[str], size: int, batch: int, views: int, random_init: bool, device: str, threads: int
) -> float:
    """Views/s of only the teachers' forward on pre-decoded uint8 views (the ceiling for the pipeline)."""

    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        loaded = []
        for name in teachers:
            spec = get_teacher(name)
            random = random_init or spec.tiny
            choice = WeightsChoice("random", seed=0) if random else WeightsChoice("pretrained")
            loaded.append(load_teacher(spec, choice, size, device=device))
        inputs = {
            t.spec.name: torch.randint(0, 256, (batch, 3, *t.input_hw), dtype=torch.uint8, device=device)
            for t in loaded
        }
        for t in loaded:  # warm-up
            t.forward_levels(inputs[t.spec.name])
        done, t0 = 0, time.perf_counter()
        while done < views:
            for t in loaded:
                maps = t.forward_levels(inputs[t.spec.name])
                _ = [m.cpu() for m in maps]  # the pipeline copies features to the host too
            done += batch
        if device == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)


def flops_per_view(teachers: list[str], size: int) -> float:
    """Matmul FLOPs of one view through every teacher, each up to its deepest stored level."""

    total = 0.0
    for name in teachers:
        spec = get_teacher(name)
        linear, attention = teacher_macs(spec, size, max(spec.levels) + 1)
        total += 2 * (linear + attention)
    return total


def peaks(device: str) -> dict[str, float | None]:
    """bf16 peaks in TFLOP/s: the datasheet's for this GPU (None when unknown) and a measured matmul."""

    if device != "cuda":
        return {"datasheet_tflops": None, "measured_tflops": None}
    name = torch.cuda.get_device_name().lower()
    by_length = sorted(GPU_PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0]))  # "h100 pcie" before "h100"
    sheet = next((v for k, v in by_length if k.replace("_", " ") in name), None)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return {"datasheet_tflops": sheet, "measured_tflops": 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12}


def mfu(views_per_s: float, flops: float, peak_tflops: float | None) -> float | None:
    return views_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None


def extract_config(args, teachers: list[str], source: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(
        source=str(source),
        out=str(out),
        teachers=tuple(teachers),
        views_per_image=args.views_per_image,
        size=args.size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        limit=args.images,
        random_init=args.random_init,
        progress=False,
    )


def pipeline_row(args, teachers: list[str], tmp: Path) -> tuple[dict, int]:
    """(row, views) of one real extraction; the rate is its steady state (start-up excluded)."""

    source = Path(args.source) if args.source else tmp / "images"
    if not args.source:
        make_images(source, args.images)
    cfg = extract_config(args, teachers, source, tmp / "cache")
    t0 = time.perf_counter()
    out = run_extraction(cfg)
    wall = time.perf_counter() - t0
    cache = read_cache(out)
    manifests = [read_store_manifest(out / e.path) for e in cache.stores.values()]
    tp = manifests[0].throughput
    per_view = {}
    for m in manifests:
        store = out / "teachers" / m.fingerprint
        nbytes = sum(p.stat().st_size for p in (store / "levels").rglob("*") if p.is_file())
        per_view[m.teacher.name] = nbytes / cache.num_views
    row = {
        "measure": "pipeline",
        "views_per_s": tp.steady_views_per_s or tp.views_per_s,
        "views_per_s_with_startup": tp.views_per_s,
        "views": cache.num_views,
        "wall_s": wall,
        "bytes_per_view": per_view,
    }
    return row, cache.num_views


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="dinov2_tiny,clip_tiny,sam_tiny")
    ap.add_argument("--source", help="image folder (default: procedural JPEGs)")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--views-per-image", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--random-init", action="store_true", help="random weights for real teachers")
    ap.add_argument("--skip-without-cuda", action="store_true", help="see the docstring")
    ap.add_argument("--json", help="also write the results here (as each figure lands)")
    args = ap.parse_args(argv)

    teachers = [t.strip() for t in args.teachers.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flops = flops_per_view(teachers, args.size)
    report = StepReport(args.json, config=vars(args), code_version=code_version(), flops_per_view=flops)
    extract_config(args, teachers, Path("images"), Path("cache"))  # the run's config can be made
    if args.skip_without_cuda and device != "cuda":
        return report.skip("no CUDA")
    cpus = os.cpu_count() or 1
    cpu = f"CPU ({platform.processor() or 'x86_64'}, {cpus} cores)"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else cpu
    peak = peaks(device)
    report.update(device=dev_name, peaks=peak)

    with tempfile.TemporaryDirectory() as tmp:
        pipe, views = pipeline_row(args, teachers, Path(tmp))
    pipe.update(mfu_datasheet=mfu(pipe["views_per_s"], flops, peak["datasheet_tflops"]))
    pipe.update(mfu_measured_peak=mfu(pipe["views_per_s"], flops, peak["measured_tflops"]))
    report.add(pipe)
    threads = 1 if device == "cuda" else max(1, cpus // (2 * max(1, cpus // 2)))
    bare_rate = bare_loop(
        teachers, args.size, args.batch_size, max(64, views), args.random_init, device, threads
    )
    bare = {"measure": "bare teacher forward", "views_per_s": bare_rate}
    bare.update(mfu_datasheet=mfu(bare_rate, flops, peak["datasheet_tflops"]))
    bare.update(mfu_measured_peak=mfu(bare_rate, flops, peak["measured_tflops"]))
    report.add(bare)
    efficiency = pipe["views_per_s"] / bare_rate
    report.update(efficiency=efficiency)

    print(
        f"\nsak-cache extraction benchmark  device={dev_name}  teachers={','.join(teachers)}  "
        f"views={views}  size={args.size}  batch={args.batch_size}  {flops / 1e12:.3f} TFLOP/view"
    )
    print(f"{'measure':<44} {'views/s':>10} {'MFU':>8}")
    print("-" * 64)

    def line(label: str, rate: float, row: dict | None = None) -> None:
        value = (row or {}).get("mfu_datasheet")
        print(f"{label:<44} {rate:>10.2f} {'-' if value is None else f'{100 * value:.1f}%':>8}")

    line("full pipeline (steady state, Ray)", pipe["views_per_s"], pipe)
    line("pipeline incl. start-up", pipe["views_per_s_with_startup"] or 0.0)
    line("bare teacher forward, pre-decoded tensors", bare_rate, bare)
    print(f"{'pipeline efficiency (steady / bare)':<44} {efficiency:>10.3f}")
    print(f"\n{'teacher':<14} {'stored bytes/view':>18}")
    for name, b in pipe["bytes_per_view"].items():
        print(f"{name:<14} {b:>18,.0f}")
    return report.done()


if __name__ == "__main__":
    sys.exit(main())
