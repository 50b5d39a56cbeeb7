"""Reached through bench/loader.py --cache / --serve-s3 (or run directly).

The loader on one existing cache, and a bucket cache vs local disk (the codec x grid x compressor sweep is
bench/loader.py itself).

    python bench/loader.py --cache /caches/in1k     # one existing cache (its own codec and grid)
    python bench/loader.py --cache s3://bucket/c    # a bucket cache vs the same cache copied to local disk
    python bench/loader.py --serve-s3               # the same against a local S3 server (moto, 127.0.0.1)

Bucket vs local disk (--cache s3://... or --serve-s3): the loader reads every training batch once from the
bucket through a fresh --local-cache folder (first pass: fetch whole shard objects, hash, decode) and
again (second pass: from the local folder); without --local-cache (each pass: byte ranges of the bucket's
objects, nothing kept locally); and the same on a local copy of the cache (first pass: hash and decode,
files in the page cache; second pass: decode). One core, no loader workers, no prefetch thread: the ratio
bucket/local of samples/s per core is the cost of fetching. Bucket and disk are measured alternately
--passes times and the best of each kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")


def make_photos(root: Path, images: int) -> Path:
    from sak.pipeline.sources.synthetic import write_photo_folder  # procedural photos, shared with the tests

    return write_photo_folder(root, images)


def make_cache(photos: Path, out: Path | str, size: int, codec: str, grid: str, shard_images: int) -> str:
    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.extraction.driver import run_extraction

    cfg = ExtractConfig(
        source=str(photos), out=str(out), teachers=TEACHERS, views_per_image=2, size=size,
        shard_size=2 * shard_images, codec=codec, grid=grid, random_init=True, progress=False,
    )  # fmt: skip
    written = run_extraction(cfg)
    return out if isinstance(out, str) else str(written)  # a URL cache stays a URL


def measure_cache(cache: str, batch_size: int, passes: int) -> dict:
    """Per-core loader rates on one cache (this process, one thread)."""
    from sak.student.data.batches import BatchReader, decode_targets
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache
    from sak.student.data.order import make_stream_plan

    index = open_cache(cache)
    mean, std = input_normalization("imagenet", "tiny")
    reader = BatchReader(index, index.plan.size, mean, std)
    plan = make_stream_plan(index, batch_size, holdout_shards=0)
    per_pass = max(1, plan.epoch_length // batch_size)
    batches = [plan.batch(t)[0] for t in range(per_pass)]
    for rows in batches:  # untimed: opens arrays, hashes every shard's files once
        reader.read(rows)
    t_img, t_tgt, t_deq, n, nbytes = 0.0, 0.0, 0.0, 0, 0
    for _ in range(passes):
        for rows in batches:
            t0 = time.perf_counter()
            views = reader.read_views(rows, (reader.image_size,))
            reader.normalize(views[reader.image_size])
            t1 = time.perf_counter()
            values, scales = reader.read_targets(rows)
            t2 = time.perf_counter()
            decode_targets({"targets": values, "target_scales": scales}, index.stores, "cpu")
            t3 = time.perf_counter()
            t_img, t_tgt, t_deq, n = t_img + t1 - t0, t_tgt + t2 - t1, t_deq + t3 - t2, n + len(rows)
            nbytes += sum(t.nbytes for d in (values, scales) for ts in d.values() for t in ts)
    disk = sum(p.stat().st_size for s in index.stores for p in s.path.rglob("*") if p.is_file())
    return {
        "cache": cache,
        "codec": ",".join(sorted({s.codec for s in index.stores})),
        "grids": {s.teacher: list(s.grids[0]) for s in index.stores},
        "view_size": index.plan.size,
        "samples": n,
        "samples_per_s_per_core": n / (t_img + t_tgt),
        "image_ms_per_sample": 1e3 * t_img / n,
        "targets_ms_per_sample": 1e3 * t_tgt / n,
        "dequant_ms_per_sample": 1e3 * t_deq / n,
        "target_bytes_per_sample": nbytes / n,  # as handed over by a worker (stored dtype, + scales)
        "target_disk_bytes_per_sample": disk / index.num_views,
    }


def _passes(index, batch_size: int) -> tuple[float, float, int, object]:
    """Seconds of a first and a second pass over the training batches (reader.read), samples, the reader."""
    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.order import make_stream_plan

    mean, std = input_normalization("imagenet", "tiny")
    reader = BatchReader(index, index.plan.size, mean, std)
    plan = make_stream_plan(index, batch_size, holdout_shards=0)
    batches = [plan.batch(t)[0] for t in range(max(1, plan.epoch_length // batch_size))]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for rows in batches:
            reader.read(rows)
        times.append(time.perf_counter() - t0)
    return times[0], times[1], sum(len(r) for r in batches), reader


def measure_bucket(url: str, batch_size: int, root: Path, rounds: int) -> dict:
    """Samples/s per core from the bucket (through a fresh local cache each round) and from a local copy,
    measured alternately `rounds` times; the best of each (the machine may be shared)."""
    from sak.pipeline.buckets.bucket import Bucket
    from sak.pipeline.buckets.mirror import pull
    from sak.student.data.opening import open_cache

    local = root / "copy"
    pull(Bucket(url), local, bulk=True)
    names = ("s3_first", "s3_second", "ranged_first", "ranged_second", "disk_first", "disk_second")
    best = {k: float("inf") for k in names}
    for i in range(rounds):
        s3_first, s3_second, n, _ = _passes(open_cache(url, local_cache=str(root / f"lc{i}")), batch_size)
        ranged_first, ranged_second, _, ranged = _passes(open_cache(url), batch_size)  # by range, in place
        disk_first, disk_second, _, _ = _passes(open_cache(str(local)), batch_size)
        for k, v in zip(best, (s3_first, s3_second, ranged_first, ranged_second, disk_first, disk_second)):
            best[k] = min(best[k], v)
    return {
        "cache": url,
        "samples": n,
        "rounds": rounds,
        "bucket_first_pass_samples_per_s": n / best["s3_first"],
        "bucket_second_pass_samples_per_s": n / best["s3_second"],
        "disk_first_pass_samples_per_s": n / best["disk_first"],
        "disk_second_pass_samples_per_s": n / best["disk_second"],
        "ratio_first_pass": best["disk_first"] / best["s3_first"],
        "ratio_second_pass": best["disk_second"] / best["s3_second"],
        "ranged_first_pass_samples_per_s": n / best["ranged_first"],
        "ranged_second_pass_samples_per_s": n / best["ranged_second"],
        "ratio_ranged_first_pass": best["disk_first"] / best["ranged_first"],
        "ratio_ranged_second_pass": best["disk_second"] / best["ranged_second"],
        "ranged_requests_per_sample": ranged.ranged.requests / (2 * n),  # GETs, over both passes
        "ranged_bytes_per_sample": ranged.ranged.fetched_bytes / (2 * n),
        "shard_object_bytes_per_view": sum(
            size for rel, size in Bucket(url).listing().items() if rel.endswith(".tar") or "/c/" in rel
        )
        / ranged.index.num_views,
    }


def serve_s3(root: Path):
    """A moto S3 server on 127.0.0.1 in its own process (so that its request handling is not timed as the
    loader's), stopped by the caller, and a bucket; named in the environment before Ray starts (its workers
    inherit the environment)."""
    import os
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", SAK_STAGE_DIR=str(root / "stage"),
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    boto3.client("s3").create_bucket(Bucket="sak-bench")
    return server


def bucket_main(args) -> int:
    """--cache s3://... or --serve-s3: the loader from a bucket vs from local disk, per core."""
    from sak.cli.common import setup_logging
    from sak.pipeline.base.provenance import code_version

    setup_logging()
    torch.set_num_threads(1)
    server = None
    with tempfile.TemporaryDirectory(prefix="sak-bench-bucket-") as tmp:
        root = Path(tmp)
        try:
            url = args.cache
            if args.serve_s3:
                from sak.pipeline.extraction.runtime import ray_session

                server = serve_s3(root)
                with ray_session(None, num_cpus=2, object_store_mb=300):  # embedded, as sak-cache starts it
                    photos = make_photos(root / "photos", args.images)
                    url = make_cache(photos, "s3://sak-bench/tiny", args.size, "fp16", "native", 4)
            r = measure_bucket(url, args.batch_size, root, args.passes)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
    where = "local S3 server (moto, 127.0.0.1, its own process)" if args.serve_s3 else url
    print(f"\nLoader from {where} vs the same cache on local disk, one core, {r['samples']} samples/pass")
    print(f"{'mode':<28} {'pass':<8} {'bucket samples/s':>16} {'disk samples/s':>14} {'bucket/disk':>11}")
    for mode, key, ratio in (
        ("--local-cache (whole objects)", "bucket", "ratio"),
        ("byte ranges", "ranged", "ratio_ranged"),
    ):
        for which in ("first", "second"):
            print(
                f"{mode:<28} {which:<8} {r[f'{key}_{which}_pass_samples_per_s']:>16.1f} "
                f"{r[f'disk_{which}_pass_samples_per_s']:>14.1f} {r[f'{ratio}_{which}_pass']:>11.2f}"
            )
    print(
        f"byte ranges: {r['ranged_requests_per_sample']:.1f} GETs and {r['ranged_bytes_per_sample'] / 1e3:.1f} kB "
        f"per sample (the shard objects hold {r['shard_object_bytes_per_view'] / 1e3:.1f} kB per view)"
    )
    if args.json:
        record = {"bucket_vs_disk": r, "config": vars(args), "code_version": code_version()}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


def cache_main(args) -> int:
    """--cache DIR: per-core loader rates on one existing cache."""
    from sak.cli.common import setup_logging

    setup_logging()
    torch.set_num_threads(1)  # per-core figures
    r = measure_cache(args.cache, args.batch_size, args.passes)
    print(f"\nLoader on {args.cache}, one core: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": r, "config": vars(args)}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="an existing cache: a folder, or s3:// / gs:// (then bucket vs disk)")
    p.add_argument("--serve-s3", action="store_true", help="bucket vs disk on a local S3 server (moto)")
    p.add_argument("--size", type=int, default=384, help="view size of the cache --serve-s3 builds")
    p.add_argument("--images", type=int, default=16, help="images of the cache --serve-s3 builds (2 views)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=3, help="timed passes (alternating rounds for a bucket)")
    p.add_argument("--json", help="also write the figures, config and code version here")
    args = p.parse_args(argv)
    if args.serve_s3 or (args.cache and "://" in args.cache):
        return bucket_main(args)
    if not args.cache:
        p.error("give --cache or --serve-s3 (the codec sweep is bench/loader.py without these)")
    return cache_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
