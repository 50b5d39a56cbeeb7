"""Reached through bench/loader.py --cache / --serve-s3 (or run directly).

Training-loader throughput per CPU core, per target codec and grid, and what the paper's student needs.

    python bench/loader.py                          # builds small tiny-teacher caches itself (embedded Ray)
    python bench/loader.py --cache /caches/in1k     # one existing cache (its own codec and grid)
    python bench/loader.py --json loader.json       # also write the figures, config and code version
    python bench/loader.py --cache s3://bucket/c    # a bucket cache vs the same cache copied to local disk
    python bench/loader.py --serve-s3               # the same against a local S3 server (moto, 127.0.0.1)

Bucket vs local disk (--cache s3://... or --serve-s3): the loader reads every training batch once from the
bucket through a fresh --local-cache folder (first pass: fetch whole shard objects, hash, decode) and
again (second pass: from the local folder), and the same on a local copy of the cache (first pass: hash
and decode, files in the page cache; second pass: decode). One core, no loader workers, no prefetch
thread: the ratio bucket/local of samples/s per core is the cost of fetching. Bucket and disk are measured
alternately --passes times and the best of each kept.

Method.
  Measured: for each codec (fp16, bf16, int8, fp8) and grid (native, student) a cache of procedural JPEGs
  with the tiny random-init teachers dinov2_tiny, clip_tiny and sam_tiny is extracted (one per pair). The
  loader's per-sample work is then timed in this process, with no loader workers and
  torch.set_num_threads(1), so the rate is per core: `BatchReader.read` on the rows of the training plan,
  in batches of --batch-size, i.e. read the stored image bytes, decode, cut the view at the student size,
  normalise (the "image" column), and read + decompress every level of the 3 teacher stores into tensors
  in the stored dtype (the "targets" column). One untimed pass first (it opens the arrays and hashes each
  shard's files once, see student/data/integrity.py ShardIntegrity); then --passes timed passes over the cache, so
  files are in the page cache: this is CPU cost, not disk bandwidth. Quantised targets (int8/fp8) are
  dequantised on the training device, not in the worker: that CPU time is shown apart ("dequant").
  "cores @1000/s" = 1000 / (samples/s per core): cores the paper's ViT-B student would need at 1000
  samples/s if the targets were this small.

  Extrapolated: tiny teachers give far smaller targets than the paper's DINOv2-L and CLIP-L (27x27x1024
  at 384 px) and SAM-L (64x64x1024), each at 4 levels. For each codec, synthetic ViT-like maps
  (codecs.outlier_features) of the real level shapes are written into a real Zarr teacher store (the
  extraction's layout and Blosc-zstd) and read back as the loader reads them (sorted rows within a shard,
  values + scales in the stored dtype): that gives the worker's decode MB/s per core at each real shape.
  Real per-sample time = measured image time per sample (from the table above, same view size) + real
  target bytes / decode rate, summed over the 12 levels (native: 8 x 27x27 + 4 x 64x64; student grid:
  12 x 24x24, ViT-B/16 at 384 px). Synthetic Gaussian-like maps compress about as badly as real features
  (Blosc gains ~1.1x on fp16), so the decompression work is representative; the image time is that of
  the procedural JPEGs here (about 320-520 x 240-400 px, ImageNet-like sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CODECS = ("fp16", "bf16", "int8", "fp8")
GRIDS = ("native", "student")
TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")
# the paper's configuration at 384 px: (levels, H, W, C) per teacher
REAL_NATIVE = {"dinov2_l": (4, 27, 27, 1024), "clip_l": (4, 27, 27, 1024), "sam_l": (4, 64, 64, 1024)}
REAL_STUDENT = {t: (4, 24, 24, 1024) for t in REAL_NATIVE}  # ViT-B/16 at 384: a 24x24 grid


def make_photos(root: Path, images: int) -> Path:
    from sak.pipeline.synthetic import write_photo_folder  # procedural photos, shared with the tests

    return write_photo_folder(root, images)


def make_cache(photos: Path, out: Path | str, size: int, codec: str, grid: str, shard_images: int) -> str:
    from sak.pipeline.extract import ExtractConfig, run_extraction

    cfg = ExtractConfig(
        source=str(photos), out=str(out), teachers=TEACHERS, views_per_image=2, size=size,
        shard_size=2 * shard_images, codec=codec, grid=grid, random_init=True, progress=False,
    )  # fmt: skip
    written = run_extraction(cfg)
    return out if isinstance(out, str) else str(written)  # a URL cache stays a URL


def measure_cache(cache: str, batch_size: int, passes: int) -> dict:
    """Per-core loader rates on one cache (this process, one thread)."""
    from sak.student.data.loader import BatchReader, decode_targets, input_normalization, open_cache
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


def _passes(index, batch_size: int) -> tuple[float, float, int]:
    """Seconds of a first and a second pass over the training batches (reader.read), and samples."""
    from sak.student.data.loader import BatchReader, input_normalization
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
    return times[0], times[1], sum(len(r) for r in batches)


def measure_bucket(url: str, batch_size: int, root: Path, rounds: int) -> dict:
    """Samples/s per core from the bucket (through a fresh local cache each round) and from a local copy,
    measured alternately `rounds` times; the best of each (the machine may be shared)."""
    from sak.pipeline.storage import Bucket, pull
    from sak.student.data.loader import open_cache

    local = root / "copy"
    pull(Bucket(url), local, bulk=True)
    best = {k: float("inf") for k in ("s3_first", "s3_second", "disk_first", "disk_second")}
    for i in range(rounds):
        s3_first, s3_second, n = _passes(open_cache(url, local_cache=str(root / f"lc{i}")), batch_size)
        disk_first, disk_second, _ = _passes(open_cache(str(local)), batch_size)
        for k, v in zip(best, (s3_first, s3_second, disk_first, disk_second)):
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
    }


def serve_s3(root: Path):
    """A moto S3 server on 127.0.0.1 (stopped by the caller) and a bucket, named in the environment before
    Ray starts (its workers inherit the environment)."""
    import logging
    import os
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", SAK_STAGE_DIR=str(root / "stage"),
    )  # fmt: skip
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    boto3.client("s3").create_bucket(Bucket="sak-bench")
    return server


def measure_real_decode(codec_name: str, shapes: list[tuple[int, int, int]], root: Path, reps: int) -> dict:
    """Worker decode (Zarr read + Blosc + to tensors) of real-size levels: {shape: (ms/sample, MB/s)}."""
    from sak.pipeline.codecs import get_codec, outlier_features
    from sak.pipeline.store import create_teacher_store, open_teacher_store

    codec = get_codec(codec_name)
    n = 4  # samples = one shard
    out = {}
    for i, (h, w, c) in enumerate(shapes):
        path = root / f"{codec_name}-{h}x{w}x{c}"
        create_teacher_store("zarr", path, n, n, {0: (h, w, c)}, codec)
        store = open_teacher_store("zarr", path, codec_name, n)
        store.write_shard(0, 0, {0: outlier_features(n, h, w, c, seed=i)})
        rows = np.arange(n)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            enc = store.read_encoded_rows(0, rows)
            if codec.scaled:
                codec.to_torch(enc.values, enc.scales)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:]) / n
        nbytes = codec.bytes_per_sample(h, w, c)
        deq = []
        for _ in range(reps):  # CPU dequantisation, for reference (training does it on the device)
            t0 = time.perf_counter()
            codec.decode(enc.values, enc.scales)
            deq.append(time.perf_counter() - t0)
        t_deq = min(deq) / n
        out[f"{h}x{w}x{c}"] = {
            "ms_per_level": 1e3 * t,
            "decode_MB_per_s": nbytes / t / 1e6,
            "bytes_per_level": nbytes,
            "dequant_MB_per_s": nbytes / t_deq / 1e6,
        }
    return out


def extrapolate(codec: str, decode: dict, image_ms: float, layout: dict) -> dict:
    ms, nbytes = image_ms, 0
    for levels, h, w, c in layout.values():
        d = decode[f"{h}x{w}x{c}"]
        ms += levels * d["ms_per_level"]
        nbytes += levels * d["bytes_per_level"]
    return {
        "codec": codec,
        "target_MB_per_sample": nbytes / 1e6,
        "ms_per_sample": ms,
        "samples_per_s_per_core": 1e3 / ms,
        "cores_at_1000": 1000 / (1e3 / ms),
    }


def bucket_main(args) -> int:
    """--cache s3://... or --serve-s3: the loader from a bucket vs from local disk, per core."""
    from sak.cli.common import setup_logging
    from sak.pipeline.provenance import code_version

    setup_logging()
    torch.set_num_threads(1)
    server = None
    with tempfile.TemporaryDirectory(prefix="sak-bench-bucket-") as tmp:
        root = Path(tmp)
        try:
            url = args.cache
            if args.serve_s3:
                import ray

                server = serve_s3(root)
                ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
                photos = make_photos(root / "photos", args.images)
                url = make_cache(photos, "s3://sak-bench/tiny", args.size, "fp16", "native", 4)
                ray.shutdown()
            r = measure_bucket(url, args.batch_size, root, args.passes)
        finally:
            if server is not None:
                server.stop()
    where = "local S3 server (moto, 127.0.0.1)" if args.serve_s3 else url
    print(f"\nLoader from {where} vs the same cache on local disk, one core, {r['samples']} samples/pass")
    print(f"{'pass':<8} {'bucket samples/s':>16} {'disk samples/s':>14} {'bucket/disk':>11}")
    for which in ("first", "second"):
        print(
            f"{which:<8} {r[f'bucket_{which}_pass_samples_per_s']:>16.1f} "
            f"{r[f'disk_{which}_pass_samples_per_s']:>14.1f} {r[f'ratio_{which}_pass']:>11.2f}"
        )
    if args.json:
        record = {"bucket_vs_disk": r, "config": vars(args), "code_version": code_version()}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="measure this existing cache only [default: build tiny ones]")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--size", type=int, default=384, help="view size of the caches this script builds")
    p.add_argument("--images", type=int, default=16, help="images per cache this script builds (2 views)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=3, help="timed passes over each cache")
    p.add_argument("--reps", type=int, default=3, help="timed repeats of each real-size decode")
    p.add_argument("--json", help="also write the figures, config and code version here")
    p.add_argument("--serve-s3", action="store_true", help="bucket vs disk on a local S3 server (moto)")
    args = p.parse_args(argv)
    if args.serve_s3 or (args.cache and "://" in args.cache):
        return bucket_main(args)

    from sak.cli.common import setup_logging
    from sak.pipeline.provenance import code_version

    setup_logging()
    torch.set_num_threads(1)  # per-core figures
    codecs, grids = args.codecs.split(","), args.grids.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sak-bench-loader-") as tmp:
        root = Path(tmp)
        if args.cache:
            rows.append({"grid": "(cache)", **measure_cache(args.cache, args.batch_size, args.passes)})
        else:
            import ray

            ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
            photos = make_photos(root / "photos", args.images)
            for codec in codecs:
                for grid in grids:
                    cache = make_cache(photos, root / f"{codec}-{grid}", args.size, codec, grid, 4)
                    rows.append({"grid": grid, **measure_cache(cache, args.batch_size, args.passes)})
            ray.shutdown()
        real_codecs = sorted({r["codec"] for r in rows}, key=lambda c: (c not in CODECS, c))
        shapes = sorted({v[1:] for d in (REAL_NATIVE, REAL_STUDENT) for v in d.values()})
        decode = {c: measure_real_decode(c, shapes, root / "real", args.reps) for c in real_codecs}
    image_ms = statistics.median(r["image_ms_per_sample"] for r in rows)
    real = [
        {"grid": g, **extrapolate(c, decode[c], image_ms, layout)}
        for c in real_codecs
        for g, layout in (("native", REAL_NATIVE), ("student", REAL_STUDENT))
    ]

    print(f"\nMeasured: tiny teachers {', '.join(TEACHERS)}, views {rows[0]['view_size']} px, one core")
    print(
        f"{'codec':<6} {'grid':<8} {'samples/s':>9} {'image ms':>9} {'targets ms':>10} {'dequant ms':>10} "
        f"{'KB/sample':>9} {'disk KB':>8} {'cores @1000/s':>13}"
    )
    for r in rows:
        print(
            f"{r['codec']:<6} {r['grid']:<8} {r['samples_per_s_per_core']:>9.1f} {r['image_ms_per_sample']:>9.2f} "
            f"{r['targets_ms_per_sample']:>10.2f} {r['dequant_ms_per_sample']:>10.2f} "
            f"{r['target_bytes_per_sample'] / 1e3:>9.1f} {r['target_disk_bytes_per_sample'] / 1e3:>8.1f} "
            f"{1000 / r['samples_per_s_per_core']:>13.1f}"
        )
    print("\nWorker decode of real-size levels (Zarr + Blosc-zstd -> stored-dtype tensors), one core:")
    print(f"{'codec':<6} " + " ".join(f"{s:>22}" for s in decode[real_codecs[0]]))
    for c in real_codecs:
        cells = [
            f"{d['decode_MB_per_s']:>7.0f} MB/s {d['ms_per_level']:>6.1f} ms" for d in decode[c].values()
        ]
        print(f"{c:<6} " + " ".join(f"{x:>22}" for x in cells))
    print(
        f"\nExtrapolated to the paper's targets (DINOv2-L, CLIP-L 4 x 27x27x1024, SAM-L 4 x 64x64x1024; "
        f"student grid 12 x 24x24x1024) + {image_ms:.2f} ms image decode+cut per sample:"
    )
    print(
        f"{'codec':<6} {'grid':<8} {'MB/sample':>9} {'ms/sample':>9} {'samples/s':>9} {'cores @1000/s':>13}"
    )
    for r in real:
        print(
            f"{r['codec']:<6} {r['grid']:<8} {r['target_MB_per_sample']:>9.2f} {r['ms_per_sample']:>9.2f} "
            f"{r['samples_per_s_per_core']:>9.1f} {r['cores_at_1000']:>13.1f}"
        )
    if args.json:
        record = {
            "kind": "sak-bench-loader",
            "config": vars(args),
            "code_version": code_version(),
            "torch": torch.__version__,
            "measured": rows,
            "real_decode": decode,
            "extrapolated": real,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
