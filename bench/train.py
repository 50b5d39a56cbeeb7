"""Stage-1 step time: training from the cache, with live teachers (--online), and the student alone.

    python bench/train.py                                      # CPU: tiny student, own tiny-teacher cache
    python bench/train.py --student vit_b --device cuda --batch-size 64 --size 384
    python bench/train.py --cache /caches/in1k --student vit_b --device cuda --num-workers 8

Rows of the table (one student, one per-step batch, one device):
  cache         the real trainer (train_stage1) streaming images + targets from the cache, loader workers
  online        the same trainer with targets from the live teachers rebuilt from the store manifests
  student only  forward + backward + AdamW step of the student on one batch already on the device
Step times are medians over the timed steps (the first --warmup steps are dropped); the data-wait fraction
is the mean share of a step spent waiting for the loader. The cache row approaching the student-only row
means the loader keeps up. Without --cache a cache of procedural images with the tiny random-init teachers
(dinov2_tiny, clip_tiny, sam_tiny, or --extract-teachers, random init) is extracted first, on an embedded
Ray. `--kernels on|off|both` runs every row with the fused kernels, without, or both ways. `--json OUT` also
writes the figures with the resolved config and code version.

    python bench/train.py --student vit_b --device cuda --size 384 --extract-teachers dinov2_l,clip_l,sam_l \
        --kernels both                                          # what `make gpu-check` runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY_TEACHERS = "dinov2_tiny,clip_tiny,sam_tiny"


def make_cache(
    root: Path, images: int, size: int, shard_images: int, teachers: str = TINY_TEACHERS, batch_size: int = 32
) -> str:
    from sak.pipeline.extract import ExtractConfig, run_extraction
    from sak.pipeline.synthetic import write_photo_folder  # procedural photos, shared with the tests

    photos = write_photo_folder(root / "photos", images)
    cfg = ExtractConfig(
        source=str(photos),
        out=str(root / "cache"),
        teachers=tuple(t for t in teachers.split(",") if t),
        batch_size=batch_size,
        views_per_image=2,
        size=size,
        shard_size=2 * shard_images,
        random_init=True,
        progress=False,
    )
    return str(run_extraction(cfg))


def trainer_row(cfg, warmup: int) -> dict:
    from sak.student.train.stage1 import train_stage1

    train_stage1(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train"][warmup:]
    step = statistics.median(r["step_time_s"] for r in timed)
    return {
        "step_ms": 1e3 * step,
        "samples_per_s": cfg.batch_size / step,
        "data_wait": statistics.fmean(r["data_wait_fraction"] for r in timed),
    }


def student_only_row(cfg, steps: int, warmup: int) -> dict:
    """The student's own step on one batch kept on the device: the ceiling for the trainer."""
    from sak.pipeline.teachers import bf16_autocast
    from sak.student.data.batches import BatchReader, decode_targets
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache
    from sak.student.data.order import make_stream_plan
    from sak.student.train.losses import distillation_loss
    from sak.student.train.stage1 import build_student_for
    from sak.student.train.targets import stored_levels

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    index = open_cache(cfg.cache, cfg.teachers)
    mean, std = input_normalization(cfg.normalization, cfg.student)
    reader = BatchReader(index, index.plan.size, mean, std)
    plan = make_stream_plan(index, cfg.batch_size, seed=cfg.seed, holdout_shards=cfg.holdout_shards)
    batch = reader.read(plan.batch(0)[0])
    images = batch["images"].to(device)  # (B, 3, S, S)
    targets = decode_targets(batch, index.stores, device)
    model = build_student_for(cfg, index).to(device)
    use_kernels = bool(cfg.use_kernels)
    model.use_kernels = use_kernels
    if device.type == "cpu" and cfg.num_workers:
        from sak.student.train.stage1 import cpu_compute_threads

        torch.set_num_threads(
            cpu_compute_threads(cfg.num_workers)
        )  # the trainer's thread count, for a fair row
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with bf16_autocast(device):
            maps = stored_levels(model(images).distill_maps, index.stores)
            loss, _ = distillation_loss(maps, targets, use_kernels=use_kernels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # note: host-device sync, as the trainer's per-step logging does
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step_ms": 1e3 * step, "samples_per_s": cfg.batch_size / step, "data_wait": None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="an existing cache [default: extract a tiny one]")
    p.add_argument(
        "--teachers", default="", help="comma list of teachers / store fingerprints [default: all]"
    )
    p.add_argument("--student", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="view size of the cache this script extracts")
    p.add_argument("--images", type=int, default=96, help="images of the cache this script extracts")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per row")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda [default: cuda when available]")
    p.add_argument("--skip-online", action="store_true")
    p.add_argument(
        "--extract-teachers",
        default=TINY_TEACHERS,
        help="teachers of the cache this script extracts (random init)",
    )
    p.add_argument(
        "--extract-batch-size", type=int, default=32, help="views per teacher forward when extracting"
    )
    p.add_argument(
        "--kernels", choices=["off", "on", "both"], default="off", help="fused kernels in every row"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from sak.cli.common import setup_logging
    from sak.pipeline.provenance import code_version
    from sak.student.train.stage1_config import Stage1Config

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="sak-bench-train-") as tmp:
        root = Path(tmp)
        cache = args.cache or make_cache(
            root, args.images, args.size, 4, args.extract_teachers, args.extract_batch_size
        )
        base = Stage1Config(
            cache=cache,
            out="",
            student=args.student,
            teachers=tuple(t for t in args.teachers.split(",") if t),
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            warmup_steps=1,
            num_workers=args.num_workers,
            log_every=10**9,
            tensorboard=False,
            device=args.device,
        )
        rows = {}
        for kernels in {"off": [False], "on": [True], "both": [False, True]}[args.kernels]:
            tag = " +kernels" if kernels else ""
            with_kernels = dataclasses.replace(base, use_kernels=kernels)
            rows[f"cache ({args.num_workers} workers){tag}"] = trainer_row(
                dataclasses.replace(with_kernels, out=str(root / f"cache_run{tag.strip()}")), args.warmup
            )
            if not args.skip_online:
                online = dataclasses.replace(
                    with_kernels, out=str(root / f"online_run{tag.strip()}"), online=True
                )
                rows[f"online teachers{tag}"] = trainer_row(online, args.warmup)
            rows[f"student only (in memory){tag}"] = student_only_row(with_kernels, args.steps, args.warmup)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} compute thread(s)"
    )
    print(
        f"\nstage-1 step time: student {args.student}, batch {args.batch_size}, {name}, code {code_version()}"
    )
    print(f"cache {cache}")
    print(f"{'mode':<28} {'step ms':>9} {'samples/s':>10} {'data wait':>10}")
    for mode, r in rows.items():
        wait = "-" if r["data_wait"] is None else f"{r['data_wait']:.0%}"
        print(f"{mode:<28} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f} {wait:>10}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"config": vars(args), "device": name, "code_version": code_version(), "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
