"""Pipeline efficiency of `sak-cache run`: full pipeline views/s against a bare teacher-forward loop.

    python bench/extract.py                                   # CPU: tiny teachers, procedural images
    python bench/extract.py --teachers dinov2_l,clip_l,sam_l --source /data/imgs --images 2048 --random-init

The pipeline figure is the steady-state rate of a real extraction (from the first finished shard to the
last, so actor start-up and teacher loading are excluded). The bare loop runs only the same teachers'
forward passes on pre-decoded uint8 views already in memory, with the same device, batch size and threads
per teacher actor. Their ratio is the pipeline efficiency (goal on a GPU: >= 0.9). Prints a table and the
stored bytes per view per teacher; `--json OUT` also writes the figures with the resolved config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_images(folder: Path, n: int) -> None:
    from sak.pipeline.sources.synthetic import write_photo_folder  # procedural photos, shared with the tests

    write_photo_folder(folder, n)


def bare_loop(
    teachers: list[str], size: int, batch: int, views: int, random_init: bool, device: str, threads: int
) -> float:
    """Views/s of only the teachers' forward on pre-decoded uint8 views (the ceiling for the pipeline)."""
    from sak.pipeline.teachers.forward import load_teacher
    from sak.pipeline.teachers.specs import get_teacher
    from sak.pipeline.teachers.weights import WeightsChoice

    if device == "cpu":
        torch.set_num_threads(threads)
    loaded = []
    for name in teachers:
        spec = get_teacher(name)
        choice = (
            WeightsChoice("random", seed=0) if (random_init or spec.tiny) else WeightsChoice("pretrained")
        )
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
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from sak.pipeline.base.provenance import code_version
    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.extraction.driver import run_extraction
    from sak.pipeline.format.documents import read_cache, read_store_manifest

    teachers = [t.strip() for t in args.teachers.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.source) if args.source else Path(tmp) / "images"
        if not args.source:
            make_images(source, args.images)
        cfg = ExtractConfig(
            source=str(source),
            out=str(Path(tmp) / "cache"),
            teachers=tuple(teachers),
            views_per_image=args.views_per_image,
            size=args.size,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            limit=args.images,
            random_init=args.random_init,
            progress=False,
        )
        out = run_extraction(cfg)
        cache = read_cache(out)
        manifests = [read_store_manifest(out / e.path) for e in cache.stores.values()]
        tp = manifests[0].throughput
        pipeline_rate = tp.steady_views_per_s or tp.views_per_s
        per_view = {}
        for m in manifests:
            store = out / "teachers" / m.fingerprint
            nbytes = sum(p.stat().st_size for p in (store / "levels").rglob("*") if p.is_file())
            per_view[m.teacher.name] = nbytes / cache.num_views
    cpus = os.cpu_count() or 1
    threads = 1 if device == "cuda" else max(1, cpus // (2 * max(1, cpus // 2)))
    bare_rate = bare_loop(
        teachers, args.size, args.batch_size, max(64, cache.num_views), args.random_init, device, threads
    )
    ratio = pipeline_rate / bare_rate

    dev_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or 'x86_64'}, {cpus} cores)"
    )
    print(
        f"\nsak-cache extraction benchmark  device={dev_name}  teachers={','.join(teachers)}  "
        f"views={cache.num_views}  size={args.size}  batch={args.batch_size}"
    )
    print(f"{'measure':<44} {'views/s':>10}")
    print("-" * 56)
    print(f"{'full pipeline (steady state, Ray)':<44} {pipeline_rate:>10.2f}")
    print(f"{'pipeline incl. start-up':<44} {tp['views_per_s']:>10.2f}")
    print(f"{'bare teacher forward, pre-decoded tensors':<44} {bare_rate:>10.2f}")
    print(f"{'pipeline efficiency (steady / bare)':<44} {ratio:>10.3f}")
    print(f"\n{'teacher':<14} {'stored bytes/view':>18}")
    for name, b in per_view.items():
        print(f"{name:<14} {b:>18,.0f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": vars(args),
                    "code_version": code_version(),
                    "device": dev_name,
                    "pipeline_views_per_s": pipeline_rate,
                    "pipeline_with_startup_views_per_s": tp["views_per_s"],
                    "bare_views_per_s": bare_rate,
                    "efficiency": ratio,
                    "bytes_per_view": per_view,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
