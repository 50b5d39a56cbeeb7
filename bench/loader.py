"""Training-loader cost per CPU core at the paper's real target shapes, per codec x grid x compressor x
student views, and the cores a ViT-B student at 1000 samples/s needs.

    python bench/loader.py --json loader.json        # every row; ~5 min on one core
    python bench/loader.py --cache s3://bucket/c     # a bucket cache vs the same cache on local disk
    python bench/loader.py --serve-s3                # the same against a local S3 server (moto, 127.0.0.1)
    python bench/loader.py --codecs fp16,int8 --compressors none,zstd
    python bench/loader.py --codecs fp16,pca64,pca256,pca256-fp8 --compressors none   # the pca rows

Method (one process, torch and Blosc on one thread, timed in process CPU seconds, best of --reps: every
figure is per core; files are in the page cache, so this is CPU cost, not storage bandwidth: see
`sak-cache estimate --read-gbps`).

  Image part, measured on a real cache: procedural JPEGs (ImageNet-like sizes, 320-520 x 240-400 px)
  extracted at 384 px with one tiny random-init teacher and `--student-views raw`, then read by the
  loader's own `BatchReader.read_views` + `normalize` in batches of --batch-size, both ways: "decode"
  (read the JPEG, decode, cut_view: crop + antialiased bicubic resize) and "raw" (the stored uint8 pixels).

  Target part, measured at the real shapes: the paper's teachers at 384 px are DINOv2-L and CLIP-L
  (4 levels of 27x27x1024 each) and SAM-L (4 of 64x64x1024): the native grid; on the student grid
  (ViT-B/16 at 384 px) all 12 levels are 24x24x1024. For each codec and compressor one shard of
  synthetic ViT-like maps (codecs.outlier_features: massive channels, high-norm tokens) per level shape
  is written by the extraction's own Zarr store, then read as the loader reads a batch: the rows of one
  shard in shuffled order, `ShardRows.read_into` straight into the batch, then to tensors in the stored
  dtype (quantised values are dequantised on the training device, not here; pca<k> coefficients, k
  wide, are decoded there too, by one matmul with the basis fitted on that shard). The integrity check is
  the xxh3-128 of each file once per process, charged per sample as disk bytes / xxh3 rate.

  per sample = image ms + sum over the 12 levels of (read ms) + integrity ms;
  samples_per_s_per_core = 1000 / that;  cores_per_1000 = 1000 / samples_per_s_per_core.
  Synthetic maps compress about like real ones (~1.08x with zstd), so the decompression work is
  representative; what they cannot show is a real teacher's exact compressibility.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CODECS = ("fp16", "bf16", "int8", "fp8", "pca256")
GRIDS = ("native", "student")
COMPRESSORS = ("none", "lz4", "zstd")
# the paper's configuration at 384 px: (levels, H, W, C) per teacher
REAL_NATIVE = {"dinov2_l": (4, 27, 27, 1024), "clip_l": (4, 27, 27, 1024), "sam_l": (4, 64, 64, 1024)}
REAL_STUDENT = {t: (4, 24, 24, 1024) for t in REAL_NATIVE}  # ViT-B/16 at 384: a 24x24 grid
LAYOUTS = {"native": REAL_NATIVE, "student": REAL_STUDENT}
SHARD = 8  # samples per shard of the real-shape stores


def _best(fn, reps: int) -> float:
    """Best CPU seconds of this process over `reps` calls (after one warm call). CPU time, not wall time:
    with torch and Blosc on one thread that is exactly the per-core cost, and it stays meaningful on a
    machine shared with other work (wall time there counts the waits for the CPU too)."""
    fn()  # warm: opens files, fills the page cache
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def measure_images(root: Path, images: int, size: int, batch_size: int, reps: int) -> dict[str, float]:
    """ms per sample of the student input, {"decode": ..., "raw": ...}, on a real 384 px cache."""
    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.extraction.driver import run_extraction
    from sak.pipeline.extraction.runtime import ray_session
    from sak.pipeline.sources.synthetic import write_photo_folder
    from sak.student.data.batches import BatchReader
    from sak.student.data.normalization import input_normalization
    from sak.student.data.opening import open_cache

    photos = write_photo_folder(root / "photos", images)
    with ray_session(None, num_cpus=2, object_store_mb=300):  # embedded: never a stale `ray start` cluster
        cache = run_extraction(
            ExtractConfig(
                source=str(photos), out=str(root / "cache"), teachers=("clip_tiny",), size=size,
                shard_size=8, random_init=True, student_views="raw", progress=False,
            )
        )  # fmt: skip
    index = open_cache(cache)
    mean, std = input_normalization("imagenet", "tiny")
    rng = np.random.default_rng(0)
    rows = rng.permutation(index.num_views)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    out = {}
    for mode in ("decode", "raw"):
        reader = BatchReader(index, size, mean, std, with_targets=False, stored_views=mode == "raw")

        def run(reader=reader):
            for b in batches:
                reader.normalize(reader.read_views(b, (size,))[size])

        out[mode] = 1e3 * _best(run, reps) / len(rows)
    return out


def measure_levels(codec_name: str, compressor: str, root: Path, reps: int) -> dict[str, dict]:
    """Per level shape: read ms per sample (loader path) and stored bytes on disk per sample."""
    from sak.pipeline.store.codecs import get_codec, outlier_features
    from sak.pipeline.store.lowrank import prepare_bases
    from sak.pipeline.store.zarr import ShardRows, ZarrTeacherStore, create_store

    codec = get_codec(codec_name)
    shapes = sorted({v[1:] for d in LAYOUTS.values() for v in d.values()})
    rng = np.random.default_rng(1)
    out = {}
    for i, (h, w, c) in enumerate(shapes):
        path = root / f"{codec_name}-{compressor}-{h}x{w}x{c}"
        create_store(path, SHARD, SHARD, {0: (h, w, c)}, codec, compressor)
        store, maps = ZarrTeacherStore(path, codec, SHARD), {0: outlier_features(SHARD, h, w, c, seed=i)}
        prepare_bases(store, 0, maps)  # pca<k>: the basis fitted on this shard first, as extraction does
        store.write_shard(0, 0, maps)
        kinds = ["levels", "scales"] if codec.scaled else ["levels"]
        readers = [ShardRows.of(path / kind / "0") for kind in kinds]
        rows = rng.permutation(SHARD)
        order = np.argsort(rows, kind="stable")

        def run(readers=readers, rows=rows, order=order):
            parts = []
            for r in readers:
                buf = np.empty((len(rows), *r.shape[1:]), dtype=r.dtype)
                r.read_into(rows[order], buf, dest=order)
                parts.append(buf)
            codec.to_torch(*parts) if codec.scaled else codec.to_torch(parts[0])

        disk = sum(  # per-sample files only: a pca<k> basis is stored once per store and level
            p.stat().st_size
            for p in path.rglob("*")
            if p.is_file()
            and "/c/" in p.as_posix()
            and not p.relative_to(path).as_posix().startswith("basis/")
        )
        out[f"{h}x{w}x{c}"] = {
            "read_ms": 1e3 * _best(run, reps) / SHARD,
            "disk_bytes": disk / SHARD,
            "bytes": codec.bytes_per_sample(h, w, c),
        }
    return out


def measure_digests(root: Path, mb: int = 256) -> dict[str, float]:
    """MB/s per core of the integrity check over a page-cached file: sha256 (before) and xxh3-128 (now)."""
    from sak.pipeline.base.provenance import sha256_file, xxh3_file

    path = root / "digest.bin"
    path.write_bytes(os.urandom(mb << 20))
    return {
        name: (mb << 20) / _best(lambda f=f: f(path), 3) / 1e6
        for name, f in (("sha256", sha256_file), ("xxh3_128", xxh3_file))
    }


def rows_for(codecs, compressors, levels: dict, images: dict, digests: dict) -> list[dict]:
    out = []
    for codec in codecs:
        for grid, layout in LAYOUTS.items():
            for compressor in compressors:
                for views in ("decode", "raw") if compressor == compressors[0] else ("decode",):
                    lv = levels[codec, compressor]
                    read_ms = sum(n * lv[f"{h}x{w}x{c}"]["read_ms"] for n, h, w, c in layout.values())
                    disk = sum(n * lv[f"{h}x{w}x{c}"]["disk_bytes"] for n, h, w, c in layout.values())
                    raw_bytes = sum(n * lv[f"{h}x{w}x{c}"]["bytes"] for n, h, w, c in layout.values())
                    check_ms = 1e3 * disk / (digests["xxh3_128"] * 1e6)
                    ms = images[views] + read_ms + check_ms
                    out.append(
                        {
                            "codec": codec,
                            "grid": grid,
                            "compressor": compressor,
                            "student_views": views,
                            "target_MB_per_sample": raw_bytes / 1e6,
                            "disk_MB_per_sample": disk / 1e6,
                            "image_ms": images[views],
                            "targets_ms": read_ms,
                            "integrity_ms": check_ms,
                            "ms_per_sample": ms,
                            "samples_per_s_per_core": 1e3 / ms,
                            "cores_per_1000": ms,  # 1000 / (1000 / ms)
                        }
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a == "--serve-s3" or a == "--cache" or a.startswith("--cache=") for a in args):
        # one existing cache, or bucket vs local disk: bench/loader_bucket.py (same options)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loader_bucket import main as bucket_main

        return bucket_main(args)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--compressors", default=",".join(COMPRESSORS), help="the first one also gets raw views")
    p.add_argument("--size", type=int, default=384, help="view side of the image cache")
    p.add_argument("--images", type=int, default=16, help="images of the image cache (2 views each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timed repeats; the best is kept")
    p.add_argument("--json", help="also write the rows, config and code version here")
    args = p.parse_args(argv)

    import numcodecs.blosc

    from sak.cli.common import setup_logging
    from sak.pipeline.base.provenance import code_version

    setup_logging()
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    codecs, compressors = args.codecs.split(","), args.compressors.split(",")
    with tempfile.TemporaryDirectory(prefix="sak-bench-loader-") as tmp:
        root = Path(tmp)
        images = measure_images(root / "img", args.images, args.size, args.batch_size, args.reps)
        digests = measure_digests(root)
        levels = {(c, z): measure_levels(c, z, root / "real", args.reps) for c in codecs for z in compressors}
    rows = rows_for(codecs, compressors, levels, images, digests)

    print(f"\nImage part, one core, {args.size} px views: decode+cut {images['decode']:.2f} ms/sample, "
          f"stored raw views {images['raw']:.2f} ms/sample")  # fmt: skip
    print(f"Integrity check, one core, page-cached: sha256 {digests['sha256']:.0f} MB/s (before), "
          f"xxh3-128 {digests['xxh3_128']:.0f} MB/s (now)")  # fmt: skip
    print("\nPer level read, one core (ms per sample; loader path: ShardRows into the batch, to tensors):")
    shapes = list(next(iter(levels.values())))
    print(f"{'codec':<10} {'compressor':<10} " + " ".join(f"{s:>22}" for s in shapes))
    for (c, z), lv in levels.items():
        cells = [
            f"{lv[s]['read_ms']:6.2f} ms {lv[s]['bytes'] / lv[s]['read_ms'] / 1e3:6.0f} MB/s" for s in shapes
        ]
        print(f"{c:<10} {z:<10} " + " ".join(f"{x:>22}" for x in cells))
    print(
        "\nPaper targets (DINOv2-L, CLIP-L 4 x 27x27x1024, SAM-L 4 x 64x64x1024; student grid 12 x 24x24x1024):"
    )
    head = (
        f"{'codec':<10} {'grid':<8} {'compressor':<10} {'views':<7} {'MB/sample':>9} {'disk MB':>8} "
        f"{'image ms':>8} {'targets ms':>10} {'check ms':>8} {'samples/s':>9} {'cores @1000/s':>13}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['codec']:<10} {r['grid']:<8} {r['compressor']:<10} {r['student_views']:<7} "
            f"{r['target_MB_per_sample']:>9.2f} {r['disk_MB_per_sample']:>8.2f} {r['image_ms']:>8.2f} "
            f"{r['targets_ms']:>10.2f} {r['integrity_ms']:>8.2f} {r['samples_per_s_per_core']:>9.1f} "
            f"{r['cores_per_1000']:>13.1f}"
        )
    if args.json:
        record = {
            "kind": "sak-bench-loader",
            "config": vars(args),
            "code_version": code_version(),
            "torch": torch.__version__,
            "image_ms_per_sample": images,
            "digest_MB_per_s_per_core": digests,
            "levels": {f"{c}/{z}": lv for (c, z), lv in levels.items()},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
