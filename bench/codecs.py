"""Target codecs: size against fidelity and speed, on tiny-teacher features and synthetic outlier features.

    python bench/codecs.py                       # table (markdown) on this machine, one thread
    python bench/codecs.py --plot codecs.png     # + ratio-vs-fidelity plot
    python bench/codecs.py --train-steps 20      # + "effect on training" (short stage-1 runs, Rep Sim)
    python bench/codecs.py --large --json c.json # + random-init DINOv2-L and CLIP-L (27x27x1024, 4 levels)

Datasets:
  tiny teachers   dinov2_tiny, clip_tiny, sam_tiny (random init, C 64) on scikit-image photos and
                  procedural images, 224 px views: what the CPU tests and demo store
  outliers xM     synthetic ViT-L-like maps (27x27x1024): Gaussian + per-channel offsets, 3 massive channels
                  xM/2..xM for M = 100, 300, 1000, 1.5% of tokens x10 norm (codecs.outlier_features): what
                  breaks quantisers in real ViTs (Sun et al. 2024: massive activations of hundreds of times)
  random-init L   (--large) dinov2_l and clip_l with random weights at 384 px, every 4th-block level
                  (27x27x1024): the real shapes, but not the real statistics (see README)

pca<k> rows: a PcaBasis (pipeline/store/lowrank.py) fitted on the first half of the views of each map and judged on the
other half (held out, as a store fits on its first shard); coefficients in float16. Bytes per value count
the coefficients only; the basis ((k + 1) x C float32 per level, ~1 MB at k 256, C 1024) is paid once per
store, not per view.

Per codec: bytes per value as stored (values + scales) raw and after the store's Blosc-zstd (per sample
chunk, as the Zarr store compresses), ratio vs fp16 (Blosc bytes over Blosc bytes), per-token cosine to the
float32 original (mean, 1st percentile), the same cosine after standardising every channel with the
original's mean/std ("std p1": raw cosine is dominated by the outlier channels and hides damage to all
others), relative L2 error, encode and decode throughput per core (MB/s of float32 features, one thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numcodecs import Blosc

# ------------------------------------------------------------------------------------------- data


def _photos(n: int, side: int) -> torch.Tensor:
    """(n, 3, side, side) uint8: scikit-image's photos, then procedural ones."""
    imgs = []
    try:
        from skimage import data

        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
            a = np.asarray(getattr(data, name)())[..., :3]
            imgs.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
    except Exception:  # noqa: BLE001 - scikit-image is a test extra; procedural images suffice
        pass
    from sak.pipeline.sources.synthetic import make_photo

    i = 0
    while len(imgs) < n:
        imgs.append(torch.from_numpy(np.array(make_photo(i, 320, 240))).permute(2, 0, 1))
        i += 1
    out = [
        F.interpolate(x[None].float(), size=(side, side), mode="bilinear", antialias=True).clamp(0, 255)
        for x in imgs[:n]
    ]
    return torch.cat(out).round().to(torch.uint8)


def tiny_teacher_features(views: int = 8, size: int = 224) -> list[torch.Tensor]:
    """Every level of the three tiny teachers on `views` images: a list of (views, H, W, 64) float32."""
    from sak.pipeline.teachers.forward import load_teacher
    from sak.pipeline.teachers.specs import get_teacher
    from sak.pipeline.teachers.weights import WeightsChoice

    maps = []
    for name in ("dinov2_tiny", "clip_tiny", "sam_tiny"):
        t = load_teacher(get_teacher(name), WeightsChoice("random", seed=0), size)
        maps += t.forward_levels(_photos(views, t.input_hw[0]))
    return maps


def large_teacher_features(views: int) -> list[torch.Tensor]:
    """The paper's DINOv2-L and CLIP-L with random weights at 384 px: (views, 27, 27, 1024) per level."""
    from sak.pipeline.teachers.forward import load_teacher
    from sak.pipeline.teachers.specs import get_teacher
    from sak.pipeline.teachers.weights import WeightsChoice

    maps = []
    for name in ("dinov2_l", "clip_l"):
        t = load_teacher(get_teacher(name), WeightsChoice("random", seed=0), 384)
        with torch.no_grad():
            maps += t.forward_levels(_photos(views, t.input_hw[0]))
    return maps


# ---------------------------------------------------------------------------------------- metrics


def token_cosines(x: torch.Tensor, y: torch.Tensor, standardise: bool = False) -> torch.Tensor:
    """Per-token cosine of (..., C) maps; standardise: per-channel z-scores with x's statistics first."""
    a, b = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()  # (T, C)
    if standardise:
        mu, sd = a.mean(0), a.std(0).clamp_min(1e-12)
        a, b = (a - mu) / sd, (b - mu) / sd
    return F.cosine_similarity(a, b, dim=-1)


def blosc_bytes(a: np.ndarray, shuffle: str) -> int:
    """Bytes after Blosc-zstd level 3, compressed one sample (chunk) at a time as the Zarr store does."""
    mode = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE, "noshuffle": Blosc.NOSHUFFLE}[shuffle]
    blosc = Blosc(cname="zstd", clevel=3, shuffle=mode)
    return sum(len(blosc.encode(np.ascontiguousarray(s))) for s in a)


def _timed(fn, min_seconds: float = 0.2) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 >= min_seconds:
            return (time.perf_counter() - t0) / n


class _PcaCodec:
    """bench adapter: pca<k> with the Codec calls measure() makes; fitted per map on its first half."""

    blosc_shuffle = "shuffle"

    def __init__(self, k: int) -> None:
        self.k, self.basis = k, None

    def encode_parts(self, x: torch.Tensor):
        from sak.pipeline.store.codecs import Encoded

        return Encoded(self.basis.encode(x), None)

    def decode(self, values, scales=None) -> torch.Tensor:
        return self.basis.decode_torch(values)


def _split(codec, x: torch.Tensor) -> torch.Tensor:
    """pca: fit on the first half of the views, return the held-out half; other codecs: x unchanged."""
    if not isinstance(codec, _PcaCodec):
        return x
    from sak.pipeline.store.lowrank import PcaBasis

    half = max(x.shape[0] // 2, 1)
    codec.basis = PcaBasis.fit(x[:half], codec.k)
    return x[half:] if x.shape[0] > 1 else x


def measure(codec_name: str, maps: list[torch.Tensor]) -> dict:
    """All figures of one codec on a list of (n, H, W, C) maps (pooled)."""
    from sak.pipeline.store.codecs import get_codec

    codec = _PcaCodec(int(codec_name[3:])) if codec_name.startswith("pca") else get_codec(codec_name)
    values = raw = packed = 0
    cos, cos_std, err2, ref2 = [], [], 0.0, 0.0
    t_enc = t_dec = 0.0
    timed_values, shapes = 0, set()
    for x in maps:
        x = _split(codec, x)
        enc = codec.encode_parts(x)
        y = codec.decode(*enc)
        values += x.numel()
        raw += enc.values.nbytes + (enc.scales.nbytes if enc.scales is not None else 0)
        packed += blosc_bytes(enc.values, codec.blosc_shuffle)
        if enc.scales is not None:
            packed += blosc_bytes(enc.scales, "shuffle")
        cos.append(token_cosines(x, y))
        cos_std.append(token_cosines(x, y, standardise=True))
        err2 += float((y.double() - x.double()).square().sum())
        ref2 += float(x.double().square().sum())
        if x.shape not in shapes:  # time one map per shape (levels of a teacher share it)
            shapes.add(x.shape)
            timed_values += x.numel()
            t_enc += _timed(lambda x=x: codec.encode_parts(x))
            t_dec += _timed(lambda enc=enc: codec.decode(*enc))
    cos, cos_std = torch.cat(cos), torch.cat(cos_std)
    mb = timed_values * 4 / 1e6  # float32 features
    return {
        "codec": codec_name,
        "raw_bytes_per_value": raw / values,
        "blosc_bytes_per_value": packed / values,
        "cos_mean": float(cos.mean()),
        "cos_p1": float(torch.quantile(cos.float(), 0.01)),
        "std_cos_p1": float(torch.quantile(cos_std.float(), 0.01)),
        "std_cos_mean": float(cos_std.mean()),
        "rel_l2": (err2 / ref2) ** 0.5,
        "encode_mb_s": mb / t_enc,
        "decode_mb_s": mb / t_dec,
    }


def run_table(datasets: dict[str, list[torch.Tensor]], codecs: list[str]) -> list[dict]:
    rows = []
    for ds, maps in datasets.items():
        fp16 = None
        for name in codecs:
            r = measure(name, maps)
            r["dataset"] = ds
            if name == "fp16":
                fp16 = r
            rows.append(r)
        for r in rows:
            if r["dataset"] == ds and fp16 is not None:
                r["ratio_raw"] = fp16["raw_bytes_per_value"] / r["raw_bytes_per_value"]
                r["ratio_blosc"] = fp16["blosc_bytes_per_value"] / r["blosc_bytes_per_value"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| dataset | codec | B/value raw | B/value Blosc | vs fp16 (Blosc) | cos mean | cos p1 | std cos p1 "
        "| rel L2 | enc MB/s | dec MB/s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['codec']} | {r['raw_bytes_per_value']:.3f} | {r['blosc_bytes_per_value']:.3f} "
            f"| {r.get('ratio_blosc', float('nan')):.2f}x | {r['cos_mean']:.6f} | {r['cos_p1']:.6f} "
            f"| {r['std_cos_p1']:.4f} | {r['rel_l2']:.4f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in (
        (axes[0], "cos_p1", "1 - per-token cosine, 1st percentile"),
        (axes[1], "std_cos_p1", "1 - standardised per-token cosine, 1st percentile"),
    ):
        for ds, marker in zip(sorted({r["dataset"] for r in rows}), "osv^D"):
            pts = [r for r in rows if r["dataset"] == ds and r["codec"] != "fp32"]
            ax.scatter(
                [r["ratio_blosc"] for r in pts], [max(1 - r[key], 1e-9) for r in pts], marker=marker, label=ds
            )
            for r in pts:
                ax.annotate(r["codec"], (r["ratio_blosc"], max(1 - r[key], 1e-9)), fontsize=7)
        ax.axhline(0.01, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("size ratio vs fp16 (both after Blosc-zstd)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("target codecs: smaller (right) against fidelity loss (down is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------ effect on training
# Short stage-1 runs from an fp16 cache and from a cache extracted with each lossy codec (same images, same
# view plan, so the same views); the figure is the Rep Sim difference on the held-out shards, every student
# judged against the fp16 targets. A second fp16 run with another seed gives the noise floor.


def training_effect(codecs: list[str], steps: int, workdir: Path) -> list[dict]:
    try:
        from sak.student.train.stage1 import train_stage1
        from sak.student.train.stage1_config import Stage1Config
    except ImportError as e:
        print(f"effect on training: skipped, sak.student.train.stage1 is not importable ({e})")
        return []

    from sak.pipeline.extraction.config import ExtractConfig
    from sak.pipeline.extraction.driver import run_extraction
    from sak.student.train.evaluate import repsim_of_checkpoint  # Rep Sim of a saved student on another cache

    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    from sak.pipeline.sources.synthetic import make_photo

    for i in range(24):
        make_photo(i, 160 + 7 * i, 120 + 5 * i).save(images / f"img{i:03d}.png")

    def extract(codec: str) -> Path:
        out = workdir / codec
        if not (out / "cache.json").exists():
            run_extraction(
                ExtractConfig(
                    source=str(images),
                    out=str(out),
                    teachers=("dinov2_tiny", "clip_tiny"),
                    views_per_image=2,
                    size=64,
                    shard_size=8,
                    codec=codec,
                    progress=False,
                )
            )
        return out

    base = extract("fp16")
    results = []
    # (label, codec of the targets, seed): a second fp16 run with another seed is the noise floor
    runs = [("fp16", "fp16", 0), ("fp16, seed 1 (noise)", "fp16", 1)]
    runs += [(c, c, 0) for c in codecs if c not in ("fp16", "fp32")]
    for label, name, seed in runs:
        cache = extract(name)  # a real lossy cache, read by the loader as stored (int8/fp8 + scales)
        run = workdir / f"run-{name}-{seed}"
        cfg = Stage1Config.debug(str(cache), str(run), steps=steps, seed=seed, report_repsim=False)
        res = train_stage1(cfg)
        rs, _ = repsim_of_checkpoint(run, base)  # every student judged against the fp16 targets
        results.append({"codec": label, "repsim": rs, "final_loss": res.losses[-1] if res.losses else None})
    ref = results[0]["repsim"]
    for r in results:
        r["repsim_minus_fp16"] = {t: r["repsim"][t] - ref[t] for t in ref if t in r["repsim"]}
    return results


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", default=None, help="comma list (default: every registered codec)")
    ap.add_argument("--views", type=int, default=8, help="views per dataset")
    ap.add_argument("--magnitudes", default="100,300,1000", help="massive-channel factors of the outliers")
    ap.add_argument("--pca", default="64,128,256", help="pca<k> ranks to add to the codecs ('' for none)")
    ap.add_argument("--large", action="store_true", help="add random-init dinov2_l and clip_l (slow on CPUs)")
    ap.add_argument("--plot", help="write the ratio-vs-fidelity plot (PNG) here")
    ap.add_argument("--json", help="also write the figures with the resolved config here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (figures are per core at 1)")
    ap.add_argument(
        "--train-steps", type=int, default=0, help="effect on training: stage-1 steps per run (0: off)"
    )
    args = ap.parse_args(argv)

    from sak.pipeline.base.provenance import code_version
    from sak.pipeline.store.codecs import codec_names, get_codec, outlier_features

    torch.set_num_threads(args.threads)
    if args.codecs:
        codecs = args.codecs.split(",")
    else:  # every registered codec once: an alias with the same settings (int8 = int8_group32) is shown once
        codecs, seen = [], set()
        for n in ["fp32", "fp16", "bf16"] + [n for n in codec_names() if n not in ("fp32", "fp16", "bf16")]:
            c = get_codec(n)
            settings = (c.store_dtype, c.true_dtype, c.granularity, c.group)
            if settings not in seen:
                seen.add(settings)
                codecs.append(n)
    codecs += [f"pca{k}" for k in args.pca.split(",") if k]
    datasets = {"tiny teachers": tiny_teacher_features(args.views)}
    for m in (float(v) for v in args.magnitudes.split(",")):
        datasets[f"outliers x{m:g}"] = [outlier_features(args.views, 27, 27, 1024, seed=0, magnitude=m)]
    if args.large:
        datasets["random-init L"] = large_teacher_features(max(args.views // 2, 2))
    rows = run_table(datasets, codecs)
    print(
        f"# target codecs ({platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__})"
    )
    print(format_table(rows))
    ok = [
        r
        for r in rows
        if r["dataset"].startswith("outliers")
        and r["ratio_blosc"] >= 2
        and r["cos_p1"] >= 0.99
        and r["std_cos_p1"] >= 0.99
        and r["codec"] != "fp32"
    ]
    print(
        "\nacceptance (>= 2x smaller than fp16 after Blosc, 1st-percentile per-token cosine >= 0.99 raw and "
        f"standardised on the outlier features): {', '.join(sorted({r['dataset'] + ': ' + r['codec'] for r in ok})) or 'NONE'}"
    )
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    train = []
    if args.train_steps:
        with tempfile.TemporaryDirectory() as tmp:
            train = training_effect(codecs, args.train_steps, Path(tmp))
        for r in train:
            diff = ", ".join(f"{t} {d:+.2e}" for t, d in r["repsim_minus_fp16"].items())
            print(
                f"effect on training: {r['codec']:<22} Rep Sim - fp16: {diff}; final loss {r['final_loss']:.4f}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"config": vars(args), "code_version": code_version(), "rows": rows, "training": train},
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
