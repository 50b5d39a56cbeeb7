"""pca<k> stores: a per-level low-rank basis beside the arrays, fitted once, before anything is encoded.

`--codec pca<k>` (float16 coefficients) or `pca<k>-fp8` (float8 e4m3 coefficients, one float16 scale per
token, as `fp8_token`) stores every token of a (teacher, level) map as k coefficients over that level's
own basis: the channel mean (C,) and the top-k principal directions (k, C), float32. The basis is fitted
by the worker that computes the store's first shard, on that shard's float32 targets, and written before
any shard is encoded; the other shards wait for it (extraction/driver.py holds them back), and a resumed run reads
the stored basis, never refits. k is clipped to the channel count (a level of C <= k channels keeps all of
them: an exact rotation, only the coefficients' rounding is lost).

Layout, beside the store's arrays (digested in the manifest's `files` table like every other file):
  Zarr:        basis/<block>/mean (C,) and basis/<block>/components (k, C): float32 arrays, one raw chunk
  WebDataset:  basis/<block>.mean.npy and basis/<block>.components.npy

Decoding needs only the stored arrays (numpy alone, Zarr shown; WebDataset: np.load the two .npy files and
the `<samplekey>.<block>.npy` coefficients):

    g = zarr.open_group(STORE, mode="r")
    coeffs = g["levels/11"][i].astype("float32")                    # (H, W, k); pca<k>-fp8: see codecs.py
    x = coeffs @ g["basis/11/components"][:] + g["basis/11/mean"][:]  # (H, W, C)

The whole basis is written under a temporary name and renamed into place, so a crash leaves either no
basis (the next run fits it) or a whole one (the next run reuses it). In a bucket (a URL cache) the fitting
worker uploads the basis files (each whole and checked) before shard 0 can be journaled, in an order that
makes a cut-short upload fail to open; the driver discards such a basis while no shard is journaled.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import push
from sak.pipeline.format.records import LevelBasis
from sak.pipeline.store.codecs import Codec, Encoded

BASIS_DIR = "basis"
DECODE = "x = coefficients @ components + mean (coefficients decoded as the values' codec says)"


@dataclass(frozen=True)
class PcaBasis:
    """A low-rank basis of one (teacher, level): the channel mean (C,) and the top-k principal directions
    (k, C), both float32, fitted on float32 features of that level (float32 covariance, float64
    mean and eigendecomposition). A map is stored as
    its coefficients (..., H, W, k) = (x - mean) @ components.T and decoded by one matmul:

        x = coefficients.astype("float32") @ components + mean          # numpy alone
    """

    mean: np.ndarray  # (C,) float32
    components: np.ndarray  # (k, C) float32, orthonormal rows, by decreasing variance
    explained: float  # fraction of the fitting sample's variance the k directions keep (nan: not known)
    _on: dict = field(default_factory=dict, compare=False, repr=False)  # (device, dtype) -> (mean, comps)

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> PcaBasis:
        """Fit on (..., C) features; k is capped at C (k >= C keeps everything: an exact rotation)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # (T, C) float32
        c = flat.shape[-1]
        if k < 1:
            raise SakError(f"pca<k> needs k >= 1, got {k}")
        if not bool(torch.isfinite(flat).all()):
            raise SakError("the features to fit a pca basis on are not all finite")
        mean = flat.double().mean(0)  # exact enough in float64, then the centred products in float32
        centred = flat - mean.float()
        cov = (centred.T @ centred).double() / max(flat.shape[0] - 1, 1)  # (C, C)
        evals, evecs = torch.linalg.eigh(cov)  # ascending, float64 (C x C: cheap)
        k = min(k, c)
        comps = evecs[:, -k:].flip(-1).T  # (k, C), largest first
        total = float(evals.clamp_min(0).sum())
        explained = float(evals[-k:].clamp_min(0).sum()) / total if total > 0 else 1.0
        return cls(mean.float().numpy(), comps.float().contiguous().numpy(), explained)

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> float32 coefficients (..., k) on the CPU."""
        m, p = torch.from_numpy(self.mean), torch.from_numpy(self.components)
        return (x.detach().float().cpu() - m) @ p.T

    def encode(self, x: torch.Tensor, dtype: torch.dtype = torch.float16) -> np.ndarray:
        """(..., H, W, C) -> coefficients (..., H, W, k) in `dtype` (float16 as stored)."""
        coeffs = self.project(x)
        if dtype == torch.float16 and float(coeffs.abs().max()) > 65504:
            raise SakError("pca coefficients exceed float16's 65504; the features are too large for fp16")
        return coeffs.to(dtype).numpy()

    def on(self, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, components) as tensors on `device`, moved there once."""
        key = (str(device), dtype)
        if key not in self._on:
            self._on[key] = (
                torch.from_numpy(self.mean).to(device, dtype),
                torch.from_numpy(self.components).to(device, dtype),
            )
        return self._on[key]

    def decode_torch(
        self, coeffs: np.ndarray | torch.Tensor, device=None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Coefficients (..., k) -> (..., C) on `device`: one matmul there (the basis is small)."""
        c = torch.from_numpy(np.ascontiguousarray(coeffs)) if isinstance(coeffs, np.ndarray) else coeffs
        c = c.to(device).to(dtype)
        mean, comps = self.on(c.device, dtype)
        return torch.addmm(mean, c.reshape(-1, self.k), comps).reshape(*c.shape[:-1], comps.shape[-1])


def basis_paths(fmt: str, block: int) -> tuple[str, str]:
    """(mean, components) of one level, relative to the store: Zarr array paths or WebDataset files."""
    if fmt == "wds":
        return f"{BASIS_DIR}/{block}.mean.npy", f"{BASIS_DIR}/{block}.components.npy"
    return f"{BASIS_DIR}/{block}/mean", f"{BASIS_DIR}/{block}/components"


def basis_record(fmt: str, block: int, rank: int, channels: int) -> LevelBasis:
    mean, components = basis_paths(fmt, block)
    return LevelBasis(
        mean=mean,
        components=components,
        mean_shape=[channels],
        components_shape=[rank, channels],
        dtype="float32",
        decode=DECODE,
    )


def has_basis(path: Path) -> bool:
    return (Path(path) / BASIS_DIR).is_dir()


# ------------------------------------------------------------------------------------------ write / read


def write_bases(path: Path, fmt: str, bases: dict[int, PcaBasis]) -> None:
    """Write every level's basis under a temporary folder, then rename it to basis/ (all or nothing)."""
    path = Path(path)
    final, tmp = path / BASIS_DIR, path / f".basis.tmp{os.getpid()}"
    if final.exists():
        raise SakError(f"{final} exists already; a stored basis is never refitted")
    for stale in path.glob(".basis.tmp*"):  # a crashed writer's (one writer per cache: the cache lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    if fmt == "wds":
        for block, b in bases.items():
            for rel, a in zip(basis_paths(fmt, block), (b.mean, b.components)):
                np.save(tmp / Path(rel).name, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    else:
        import zarr

        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for block, b in bases.items():
            level = group.require_group(str(block))
            for name, a in (("mean", b.mean), ("components", b.components)):
                arr = level.create_array(
                    name, shape=a.shape, dtype="float32", chunks=a.shape, compressors=None, fill_value=0.0
                )
                arr[...] = a
            level.attrs.update({"role": "pca basis", "block": int(block), "explained": _json_float(b)})
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    os.rename(tmp, final)


def _json_float(b: PcaBasis) -> float | None:
    return None if math.isnan(b.explained) else round(float(b.explained), 6)


def read_bases(path: Path, fmt: str, blocks: list[int] | tuple[int, ...]) -> dict[int, PcaBasis] | None:
    """Every listed level's stored basis; None when the store has no basis/ folder; a SakError naming
    the level when one is missing or unreadable."""
    path = Path(path)
    if not has_basis(path):
        return None
    out = {}
    for block in blocks:
        mean_rel, comps_rel = basis_paths(fmt, block)
        try:
            if fmt == "wds":
                mean = np.load(path / mean_rel, allow_pickle=False)
                comps = np.load(path / comps_rel, allow_pickle=False)
            else:
                import zarr

                mean = zarr.open_array(str(path / mean_rel), mode="r")[...]
                comps = zarr.open_array(str(path / comps_rel), mode="r")[...]
        except Exception as e:  # noqa: BLE001 - numpy and zarr raise many kinds on damaged files
            raise SakError(
                f"{path}: the pca basis of level {block} cannot be read ({type(e).__name__}); run "
                f"`sak-cache verify` (a store without its basis cannot be decoded: delete it and re-run)"
            ) from e
        if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0]:
            raise SakError(
                f"{path}: the pca basis of level {block} has shapes {mean.shape} and {comps.shape}, "
                f"not (C,) and (k, C); run `sak-cache verify`"
            )
        out[block] = PcaBasis(mean.astype(np.float32), comps.astype(np.float32), float("nan"))
    return out


# ---------------------------------------------------------------------------------------- the worker


def prepare_bases(store, shard: int, levels: dict[int, torch.Tensor], remote: Bucket | None = None) -> None:
    """Before a pca<k> store encodes a shard: its stored basis, or, for the first shard of a store that
    has none, one fitted on this shard's float32 targets and written first. `remote`: the store in its
    bucket (a URL cache), see `_prepare_from_bucket`."""
    if not store.codec.low_rank or all(b in store.bases for b in levels):
        return
    if remote is not None:
        _prepare_from_bucket(store, shard, levels, remote)
        return
    found = read_bases(store.path, store.format, list(levels))
    if found is not None:
        store.bases.update(found)
        return
    if shard != 0:
        raise SakError(
            f"{store.path}: the pca basis is missing, but it is fitted on shard 0 before any other shard is "
            f"encoded; delete the store folder and re-run `sak-cache run`"
        )
    fitted = {b: PcaBasis.fit(x, store.codec.rank) for b, x in levels.items()}
    write_bases(store.path, store.format, fitted)
    store.bases.update(fitted)


def _prepare_from_bucket(store, shard: int, levels: dict[int, torch.Tensor], remote: Bucket) -> None:
    """The basis of a store in a bucket, which is its only truth (a node's mirror may hold a stale one of
    an earlier run): the bucket's basis objects are fetched into a private temporary folder and read from
    there; when the bucket has none, shard 0 fits one, writes it there and uploads every file whole and
    checked before returning, so before the driver can journal the shard that fitted it."""
    with tempfile.TemporaryDirectory(prefix="sak-basis-") as tmp:
        if fetch_bases(remote, Path(tmp)):
            try:
                store.bases.update(read_bases(Path(tmp), store.format, list(levels)) or {})
            except SakError as e:
                raise SakError(str(e).replace(tmp, remote.url)) from e
            return
        if shard != 0:
            raise SakError(
                f"{remote.url}: the pca basis is missing from the bucket, but it is fitted on shard 0 before any "
                f"other shard is encoded; delete the store's objects and re-run `sak-cache run`"
            )
        fitted = {b: PcaBasis.fit(x, store.codec.rank) for b, x in levels.items()}
        write_bases(Path(tmp), store.format, fitted)
        upload_bases(remote, Path(tmp))
        store.bases.update(fitted)


def upload_bases(remote: Bucket, path: Path) -> dict[str, str]:
    """Upload a store's basis files (each as one object, checked against the local bytes; returns rel ->
    sha256). Sorted paths put each Zarr array's chunk before its zarr.json and every level before the
    group's zarr.json, so an upload cut short leaves a basis that fails to open, never one that reads as
    zeros (Zarr fills a missing chunk)."""
    rels = sorted(p.relative_to(path).as_posix() for p in (path / BASIS_DIR).rglob("*") if p.is_file())
    return push(remote, path, rels)


def fetch_bases(remote: Bucket, path: Path) -> bool:
    """A store's basis objects from its bucket into path/basis/ (a folder of this process's own); False
    when the bucket holds none."""
    listing = remote.listing(BASIS_DIR)
    for rel in sorted(listing):
        remote.get(rel, path / rel)
    return bool(listing)


def discard_bases(remote: Bucket, path: Path) -> None:
    """Delete a store's basis objects from its bucket and its local mirror (only for a store with no
    journaled shard, whose basis nothing depends on yet)."""
    for rel in remote.listing(BASIS_DIR):
        remote.delete(rel)
    shutil.rmtree(path / BASIS_DIR, ignore_errors=True)


def level_basis(store, block: int) -> PcaBasis | None:
    """A store's basis of one level (None for other codecs), read from the store when first asked for."""
    if not store.codec.low_rank:
        return None
    if block not in store.bases:
        found = read_bases(store.path, store.format, [block])
        if found is None:
            raise SakError(
                f"{store.path}: the pca basis ({BASIS_DIR}/) is missing, so the store cannot be decoded; run "
                f"`sak-cache verify`, delete the store and re-run `sak-cache run`"
            )
        store.bases.update(found)
    return store.bases[block]


# ------------------------------------------------------------------------------------ encode / decode


def encode_level(codec: Codec, basis: PcaBasis | None, x: torch.Tensor) -> Encoded:
    """(..., H, W, C) float -> what the store writes: the codec's values (and scales), of the
    coefficients (..., H, W, k) for a pca<k> codec."""
    if not codec.low_rank:
        return codec.encode_parts(x)
    if basis is None:
        raise SakError(f"codec {codec.name} needs the level's basis to encode")
    coeffs = basis.project(x)
    if codec.true_dtype == "float16" and float(coeffs.abs().amax()) > 65504:
        raise SakError(
            f"codec {codec.name}: a coefficient exceeds float16's 65504; use {codec.name}-fp8 (scaled per "
            f"token) or --codec bf16"
        )
    return codec.encode_parts(coeffs)


def decode_level(
    codec: Codec,
    basis: PcaBasis | None,
    values,
    scales=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stored values (and scales) -> (..., H, W, C) `dtype` on `device`; pca<k>: the coefficients decoded
    by their codec, then one matmul with the basis there."""
    if not codec.low_rank:
        return codec.decode_torch(values, scales, device=device, dtype=dtype)
    if basis is None:
        raise SakError(f"codec {codec.name} needs the level's basis to decode")
    coeffs = codec.decode_torch(values, scales, device=device, dtype=torch.float32)
    return basis.decode_torch(coeffs, device=coeffs.device, dtype=torch.float32).to(dtype)
