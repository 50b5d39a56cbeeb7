"""Fidelity of stored targets, measured at extraction on the user's own teachers.

For every lossy choice (a codec other than fp32/fp16, or a resampled `--grid`), the worker that writes the
first shard of a store also decodes what it stored and compares it, per level, with the float32 values the
teacher produced before encoding: per-token cosine (mean and 1st percentile) and relative L2, and the same
after standardising every channel with the reference's own mean and std (raw cosine is dominated by the few
massive channels of real ViTs and hides damage to all the others). A resampled grid is judged by bringing
the stored map back to the teacher's native grid with the same resampling, against the native map.

A pca<k> store is measured on its second shard instead (the first one fitted its basis; a store of one
shard is measured in-sample, on it).

The figures go into the shard's journal line and from there into the store manifest (`fidelity`);
`sak-cache inspect` prints them and `sak-cache run` warns when a 1st-percentile cosine is under 0.99.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sak.pipeline.format.records import LevelFidelity, StoreManifest
from sak.pipeline.store.codecs import Codec
from sak.pipeline.store.lowrank import PcaBasis, decode_level, encode_level
from sak.pipeline.store.resample import resample

WARN_BELOW = 0.99  # 1st-percentile per-token cosine (raw or standardised) under which `run` warns
EXACT_CODECS = ("fp32", "fp16")  # fp16 keeps ~3.3 significant digits: not a lossy choice here


def is_lossy(codec: Codec, native_hw: tuple[int, int], stored_hw: tuple[int, int]) -> bool:
    return codec.name not in EXACT_CODECS or tuple(native_hw) != tuple(stored_hw)


def _cosines(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(ref, out, dim=-1)


def compare(block: int, reference: torch.Tensor, stored: torch.Tensor, compared: str) -> LevelFidelity:
    """reference (n, H, W, C) float32 before encoding; stored (n, h, w, C) as decoded from the store."""
    if tuple(stored.shape[1:3]) != tuple(reference.shape[1:3]):
        stored = resample(stored, tuple(reference.shape[1:3]))
    a = reference.reshape(-1, reference.shape[-1]).double()  # (T, C)
    b = stored.reshape(-1, stored.shape[-1]).double()
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-12)
    za, zb = (a - mu) / sd, (b - mu) / sd
    cos, zcos = _cosines(a, b).float(), _cosines(za, zb).float()

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((y - x).norm() / x.norm().clamp_min(1e-30))

    return LevelFidelity(
        block=block,
        compared=compared,
        tokens=a.shape[0],
        cos_mean=round(float(cos.mean()), 6),
        cos_p1=round(float(torch.quantile(cos, 0.01)), 6),
        rel_l2=round(rel(a, b), 6),
        std_cos_mean=round(float(zcos.mean()), 6),
        std_cos_p1=round(float(torch.quantile(zcos, 0.01)), 6),
        std_rel_l2=round(rel(za, zb), 6),
    )


def measure_levels(
    codec: Codec,
    native: dict[int, torch.Tensor],
    stored: dict[int, torch.Tensor],
    bases: dict[int, PcaBasis] | None = None,
) -> list[LevelFidelity]:
    """Per kept block: native (n, H, W, C) fp32 teacher output, stored (n, h, w, C) fp32 before encoding
    (resampled when the grid is); the stored bytes are recomputed with the same codec (and, pca<k>, the
    store's basis) and decoded."""
    out = []
    for block, x in stored.items():
        ref = native[block].float()
        resampled = tuple(ref.shape[1:3]) != tuple(x.shape[1:3])
        kind = "+".join(k for k, on in (("codec", codec.name not in EXACT_CODECS), ("grid", resampled)) if on)
        basis = (bases or {}).get(block)
        decoded = decode_level(codec, basis, *encode_level(codec, basis, x))
        out.append(compare(block, ref, decoded, kind or "codec"))
    return out


def fidelity_warnings(teacher: str, manifest: StoreManifest) -> list[str]:
    """One line per level whose 1st-percentile cosine (raw or standardised) is under WARN_BELOW."""
    lines = []
    for f in manifest.fidelity or []:
        low = [
            (n, v) for n, v in (("cosine", f.cos_p1), ("standardised cosine", f.std_cos_p1)) if v < WARN_BELOW
        ]
        for name, v in low:
            lines.append(
                f"WARNING: {teacher} level {f.block}: 1st-percentile per-token {name} {v:.4f} < {WARN_BELOW} "
                f"({f.compared} {manifest.codec}); a less lossy --codec (fp8, int8_tc, fp16, a larger pca<k>) or --grid "
                f"native keeps more"
            )
    return lines


def format_fidelity(manifest: StoreManifest) -> list[str]:
    """`inspect` lines: one per level of a lossy store."""
    return [
        f"  fidelity L{f.block:<3} {f.compared:<10} cos mean {f.cos_mean:.5f} p1 {f.cos_p1:.5f} rel L2 "
        f"{f.rel_l2:.4f} | standardised cos mean {f.std_cos_mean:.5f} p1 {f.std_cos_p1:.5f} rel L2 "
        f"{f.std_rel_l2:.4f} ({f.tokens} tokens)"
        for f in manifest.fidelity or []
    ]
