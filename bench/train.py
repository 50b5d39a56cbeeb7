"""Stage-1 step time: training from the cache, with live teachers (--online), and the student alone.

    python bench/train.py                                      # CPU: tiny student, own tiny-teacher cache
    python bench/train.py --student vit_b --device cuda --batch-size 64 --size 384
    python bench/train.py --cache /caches/in1k --student vit_b --device cuda --num-workers 8

Rows (one student, one per-step batch, one device), in this order (the goals' three first):
  cache         the real trainer (train_stage1) streaming images + targets from the cache, loader workers
  student only  forward + backward + AdamW step of the student on one batch already on the device
  online        the same trainer with targets from the live teachers rebuilt from the store manifests; one
                row only (kernels off), so the teachers are built once
  then, with --kernels on|both, cache and student only again with the fused kernels
  then, with --prism NAME (e.g. prism_tiny beside --student tiny, prism_b beside vit_b), PRISM's student
  alone on the same batch: every teacher on every image, and one teacher per image (the authors')
Student-only rows also give the memory of a step: the bytes autograd saves for backward (activations,
any device) and, on CUDA, the peak allocated.
Step times are medians over the timed steps. The first --warmup steps are dropped: by default the loader's
prefetch window (workers x prefetch factor) plus 2, so that the timed steps wait on the loader's steady
rate, not on batches it made ahead while the model warmed up. The data-wait fraction is the mean share of a
step spent waiting for the loader; the cache row approaching the student-only row means the loader keeps up.
Without --cache a cache of procedural images with the tiny random-init teachers (dinov2_tiny, clip_tiny,
sam_tiny, or --extract-teachers, random init) is extracted first, on an embedded Ray. `--json OUT` writes
the figures after every timed step (a run stopped early keeps them). `--skip-without-cuda`: without CUDA,
extract a tiny cache and open it as the trainer does (the set-up), then record `skipped: no CUDA`.

    python bench/train.py --student vit_b --device cuda --size 384 --extract-teachers dinov2_l,clip_l,sam_l \
        --kernels both                                          # what `make gpu-check` runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from step_io import StepReport

from sak.cli.common import setup_logging
from sak.pipeline.base.provenance import code_version
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.pipeline.sources.synthetic import write_photo_folder  # procedural photos, shared with the tests
from sak.pipeline.teachers.forward import bf16_autocast
from sak.student.data.batches import BatchReader, decode_targets
from sak.student.data.normalization import input_normalization
from sak.student.data.opening import open_cache
from sak.student.data.order import make_stream_plan
from sak.student.train.losses import distillation_loss
from sak.student.train.prism_step import is_prism, prism_train_loss
from sak.student.train.stage1 import build_student_for, cpu_compute_threads, train_stage1
from sak.student.train.stage1_config import Stage1Config
from sak.student.train.targets import stored_levels

TINY_TEACHERS = "dinov2_tiny,clip_tiny,sam_tiny"
PREFETCH_FACTOR = 2  # CacheLoader's default: batches in flight per loader worker


def make_cache(
    root: Path, images: int, size: int, shard_images: int, teachers: str = TINY_TEACHERS, batch_size: int = 32
) -> str:

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


def summarize(step_times: list[float], waits: list[float | None], batch_size: int, warmup: int) -> dict:
    """A row from per-step seconds (all steps, warm-up included) and data-wait fractions."""
    timed, timed_waits = step_times[warmup:], [w for w in waits[warmup:] if w is not None]
    row = {"steps_run": len(step_times), "steps_timed": len(timed), "warmup": warmup}
    if timed:
        step = statistics.median(timed)
        row.update(step_ms=1e3 * step, samples_per_s=batch_size / step)
        row["data_wait"] = statistics.fmean(timed_waits) if timed_waits else None
    return row


def trainer_row(cfg, warmup: int, report: StepReport, key: str) -> dict:
    """The real trainer; the row in `report` is rewritten after every step."""

    times, waits, t_call, setup = [], [], time.perf_counter(), {}
    rows = report.fields.setdefault("rows_by_mode", {})

    def on_step(step: int, batch: dict, record: dict) -> None:
        if not times:  # cache opened, model built, teachers loaded (online), loader workers started
            setup["setup_s"] = round(time.perf_counter() - t_call - record["step_time_s"], 2)
        times.append(record["step_time_s"])
        waits.append(record["data_wait_fraction"])
        rows[key] = {**summarize(times, waits, cfg.batch_size, warmup), **setup}
        report.flush()

    train_stage1(cfg, on_step=on_step)
    return rows[key]


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the context (activation memory; a tensor
    saved twice counts twice, views count whole)."""

    def __init__(self) -> None:
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def student_only_row(
    cfg, steps: int, warmup: int, report: StepReport, key: str, teachers_per_image: int | None = None
) -> dict:
    """The student's own step on one batch kept on the device: the ceiling for the trainer. A PRISM
    student routes every teacher on every image (or `teachers_per_image`) with its own objective."""

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
        torch.set_num_threads(
            cpu_compute_threads(cfg.num_workers)
        )  # the trainer's thread count, for a fair row
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    times, rows = [], report.fields.setdefault("rows_by_mode", {})
    memory = {
        "parameters_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 2)
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        saved = SavedBytes()
        with bf16_autocast(device), saved():
            if is_prism(model):
                terms, _ = prism_train_loss(model, model, images, targets, teachers_per_image, cfg.seed, i, 0)
                loss = terms.total
            else:
                maps = stored_levels(model(images).distill_maps, index.stores)
                loss, _ = distillation_loss(maps, targets, use_kernels=use_kernels)
        memory["saved_for_backward_mib"] = round(saved.bytes / 2**20, 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # note: host-device sync, as the trainer's per-step logging does
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            memory["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        rows[key] = {**summarize(times, [None] * len(times), cfg.batch_size, warmup), **memory}
        report.flush()
    return rows[key]


def loader_workers_for_shm(index, batch_size: int, workers: int, shm: str = "/dev/shm") -> tuple[int, dict]:
    """Loader workers whose batches in flight fit /dev/shm (the DataLoader hands batches over through it),
    and the figures that decided. A batch: its float32 images and its targets as stored (2-byte codecs)."""
    per_view = 4 * 3 * index.plan.size**2 + sum(2 * s.dim * h * w for s in index.stores for h, w in s.grids)
    in_flight = PREFETCH_FACTOR * batch_size * per_view  # one worker's prefetched batches
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers, {"shm_free_gib": None}
    fit = max(1, min(workers, int(0.8 * free // in_flight)))
    return fit, {"shm_free_gib": round(free / 2**30, 2), "batch_gib": round(batch_size * per_view / 2**30, 3)}


def row_plan(kernels: str, online: bool) -> list[tuple[str, bool]]:
    """(mode, use_kernels) in run order: the goals' rows (kernels off) first, one online row."""
    settings = {"off": [False], "on": [True], "both": [False, True]}[kernels]
    plan = []
    for use_kernels in settings:
        plan += [("cache", use_kernels), ("student only", use_kernels)]
        if online and not any(mode == "online" for mode, _ in plan):
            plan.append(("online", use_kernels))
    return plan


def stage1_base(args, cache: str) -> dict:
    """The rows' configs, made and validated: {'warmup': steps dropped, 'rows': [(mode, kernels, config)]}.
    Warm-up by default: the loader's prefetch window + 2."""
    warmup = args.warmup if args.warmup is not None else args.num_workers * PREFETCH_FACTOR + 2
    base = Stage1Config(
        cache=cache,
        out="",
        student=args.student,
        teachers=tuple(t for t in args.teachers.split(",") if t),
        steps=warmup + args.steps,
        batch_size=args.batch_size,
        warmup_steps=1,
        num_workers=args.num_workers,
        log_every=10**9,
        tensorboard=False,
        device=args.device,
    )
    rows = []
    for mode, use_kernels in row_plan(args.kernels, not args.skip_online):
        key = f"{mode}{' +kernels' if use_kernels else ''}"
        cfg = dataclasses.replace(
            base, use_kernels=use_kernels, online=mode == "online", out=key.replace(" ", "_")
        )
        cfg.validate()
        rows.append((key, mode, use_kernels, cfg))
    if args.prism:  # PRISM's student beside it, on the same batch: every teacher, then one per image
        prism = dataclasses.replace(base, student=args.prism, out="prism")
        for key, per_image in ((f"{args.prism} every teacher", None), (f"{args.prism} 1 teacher/image", 1)):
            cfg = dataclasses.replace(prism, teachers_per_image=per_image)
            cfg.validate()
            rows.append((key, "student only", False, cfg))
    return {"warmup": warmup, "rows": rows}


def run_rows(args, plan: dict, root: Path, report: StepReport) -> None:
    warmup = plan["warmup"]
    report.update(warmup=warmup, row_plan=[key for key, *_ in plan["rows"]])
    for key, mode, use_kernels, cfg in plan["rows"]:
        cfg = dataclasses.replace(cfg, out=str(root / cfg.out))
        print(f"row {key} ...", flush=True)
        if mode == "student only":
            row = student_only_row(cfg, args.steps, warmup, report, key, cfg.teachers_per_image)
        else:
            row = trainer_row(cfg, warmup, report, key)
        report.add({"mode": mode if cfg.student == args.student else key, "kernels": use_kernels, **row})


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} compute thread(s)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="an existing cache [default: extract a tiny one]")
    p.add_argument(
        "--teachers", default="", help="comma list of teachers / store fingerprints [default: all]"
    )
    p.add_argument("--student", default="tiny")
    p.add_argument(
        "--prism", default=None, help="also PRISM's student of this name (prism_tiny, prism_b, ...)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="view size of the cache this script extracts")
    p.add_argument("--images", type=int, default=96, help="images of the cache this script extracts")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps per row [default: prefetch window + 2]"
    )
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
    p.add_argument("--skip-without-cuda", action="store_true", help="see the docstring")
    p.add_argument("--json", help="also write the results here (after every step)")
    args = p.parse_args(argv)

    setup_logging()
    report = StepReport(args.json, config=vars(args), code_version=code_version())
    no_cuda = args.skip_without_cuda and not torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="sak-bench-train-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        if no_cuda:  # the set-up at a size the CPU does in seconds: Ray, the store writers, the index
            cache = make_cache(root, 4, 64, 2)
        else:
            cache = args.cache or make_cache(
                root, args.images, args.size, 4, args.extract_teachers, args.extract_batch_size
            )
        report.update(cache_s=time.perf_counter() - t0)

        index = open_cache(cache, ())
        report.update(cache_views=index.num_views, cache_stores=[s.teacher for s in index.stores])
        workers, shm = loader_workers_for_shm(index, args.batch_size, args.num_workers)
        report.update(loader=shm | {"workers_asked": args.num_workers, "workers": workers})
        if workers < args.num_workers:
            print(
                f"/dev/shm has {shm['shm_free_gib']} GiB free: {workers} loader workers, not {args.num_workers}"
            )
            args.num_workers = workers
        base = stage1_base(args, cache)  # every row's config is made and validated before the CUDA check
        if no_cuda:
            return report.skip("no CUDA")
        report.update(device=device_name(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        run_rows(args, base, root, report)

    print(
        f"\nstage-1 step time: student {args.student}, batch {args.batch_size}, {report.fields['device']}, "
        f"code {code_version()}"
    )
    print(f"cache {cache}")
    print(
        f"{'mode':<34} {'step ms':>9} {'samples/s':>10} {'data wait':>10} {'saved MiB':>10} {'peak MiB':>9}"
    )
    for r in (r for r in report.rows if "step_ms" in r):
        mode = f"{r['mode']}{' +kernels' if r['kernels'] else ''}"
        wait = "-" if r["data_wait"] is None else f"{r['data_wait']:.0%}"
        saved, peak = r.get("saved_for_backward_mib", "-"), r.get("peak_allocated_mib", "-")
        print(f"{mode:<34} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f} {wait:>10} {saved:>10} {peak:>9}")
    return report.done()


if __name__ == "__main__":
    sys.exit(main())
