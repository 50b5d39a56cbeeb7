"""Target codecs: how a float32 feature map (..., H, W, C) becomes stored values (and scales) and back.

Registered by name; `Codec.describe()` goes into each store's fingerprint and manifest, so two stores of
different codec settings never share a fingerprint. A codec only maps values; the store adds lossless
Blosc-zstd on top (byte shuffle for multi-byte values, no shuffle for one-byte values: measured, bit
shuffle makes int8 and fp8 bigger).

  name           values (stored as)             scales (float16), per sample    bytes/value before Blosc
  fp32           float32                        -                               4   exact (equivalence tests)
  fp16           float16                        -                               2   the default
  bf16           bfloat16 as uint16 bits        -                               2   true dtype in attributes
  int8           int8, symmetric +-127          one per 32 channels (H, W, C/32) 1 + 2/32  (= int8_group32)
                 (how caches that record "int8" read; `--codec int8` now asks for int8_tc: codec_option)
  int8_group32   as int8                        one per 32 channels              1 + 2/32
  int8_group128  int8                           one per 128 channels (H, W, C/128) 1 + 2/128
  int8_token     int8                           one per token (H, W, 1)          1 + 2/C
  int8_channel   int8                           one per channel and view (1, 1, C) 1 + 2/(H W)
  fp8            float8_e4m3fn as uint8 bits    one per 32 channels              1 + 2/32
  fp8_token      float8_e4m3fn as uint8 bits    one per token                    1 + 2/C
  int8_tc        int8                           one per token AND one per channel 1 + 2/C + 2/(H W)
                                                 (1, 1, H*W + C): token scales, then channel scales
  pca<k>         float16 coefficients (H, W, k)  -                               2 k/C, + a basis per store
  pca<k>-fp8     float8 coefficients (H, W, k)   one per token (H, W, 1)          (k + 2)/C, + the basis
                 over a per-level basis (mean (C,), components (k, C) float32): lowrank.py

Measured (bench/codecs.py, synthetic ViT-L-like maps 27x27x1024 with 3 channels x50-100 and 1.5% of
tokens x10): `int8` is per group of 32 channels because it is the only int8 granularity that keeps the
1st-percentile per-token cosine >= 0.99 both raw (0.99990) and after per-channel standardisation
(0.994): per token destroys the ordinary channels next to an outlier channel (standardised 0.877),
per channel loses the ordinary tokens next to a high-norm one (raw 0.991), per 128 channels sits between
(0.979). It costs 1.85x less than fp16 after Blosc. `fp8` keeps its place: 2.07x less than fp16 after
Blosc with raw 0.9998 and standardised 0.9996 (a float keeps relative precision next to an outlier), at
5x the relative L2 error of int8 on outlier-free features and ~5x slower CPU decoding.

`int8_tc` is the int8 that survives massive activations (bench/codecs.py at outliers of 100x, 300x, 1000x):
every channel is first divided by its own absmax over the view (so a x1000 channel never shares a scale
with ordinary ones, the LLM.int8() concern), then every token by its own absmax over the channels (so a
high-norm token never shares a scale with ordinary tokens); both sets of scales go into the one scales
array of shape (1, 1, H*W + C): the first H*W entries are the token scales in (h, w) order, the last C
the channel scales:

    t = scales[..., 0, 0, :H*W].reshape(H, W, 1); ch = scales[..., 0, 0, H*W:]   # token, channel
    x[..., h, w, c] = float(values[..., h, w, c]) * float(t[h, w]) * float(ch[c])

Quantised codecs store two plain arrays that stock libraries read (Zarr arrays `levels/<block>` and
`scales/<block>`, or `.npy` tar members); dequantisation is `values * scales` with the scales broadcast
over their group of channels (channel granularity: over H and W):

    x[..., h, w, c] = float(values[..., h, w, c]) * float(scales[..., h, w, c // group])   # token/group
    x[..., h, w, c] = float(values[..., h, w, c]) * float(scales[..., 0, 0, c])           # channel

A scale is absmax / qmax (127 for int8, 448 for e4m3) over its group, rounded to float16 first; the values
are then quantised with that rounded scale, so decoding needs nothing but the two stored arrays. No custom
Zarr codec plug-in is used on purpose: a store must open with stock zarr/numpy, without this package.

For the loader (dequantise on the training device; workers move one byte per value):

    codec = store_codec(manifest)                                    # once per store (backends.py)
    values, scales = codec.to_torch(stored_values, stored_scales)   # worker: zero-copy tensors, collate-able
    target = codec.decode_torch(values, scales, device="cuda", dtype=torch.bfloat16)  # (B, H, W, C)

`decode` is the same on the CPU in float32. torch is imported by the methods that make tensors, so a
command's options (which name a codec) load no torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.registry import Registry

if TYPE_CHECKING:
    import torch

SCALE_DTYPE = "float16"
_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0  # float16's smallest subnormal and largest finite value


class Encoded(NamedTuple):
    values: np.ndarray  # (..., H, W, C) in the codec's store dtype
    scales: np.ndarray | None  # float16 (..., H, W, G) or (..., 1, 1, C); None for unscaled codecs


@dataclass(frozen=True)
class Codec:
    """One way to store targets. Unscaled codecs (fp32/fp16/bf16) keep the original one-array API:
    `encode(x) -> np.ndarray`, `decode(a) -> float32 tensor`. Every codec has `encode_parts`/`decode`
    with scales, and `decode_torch` for dequantising on the training device."""

    name: str
    store_dtype: str  # numpy dtype of the stored values
    true_dtype: str  # what the stored values mean: float32|float16|bfloat16|int8|float8_e4m3fn
    granularity: str | None = None  # scaled codecs: "token" | "group" | "channel"
    group: int | None = None  # channels per scale for "group"
    blosc_shuffle: str = "shuffle"  # Blosc filter the stores use for these values
    rank: int | None = None  # low-rank codecs (pca<k>): the values are k coefficients per token

    def __str__(self) -> str:
        return self.name  # as options, messages and records name it

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    def stored_width(self, channels: int) -> int:
        """Width of the stored values of a C-channel map: k (clipped to C) for pca<k>, else C."""
        return min(self.rank, channels) if self.rank is not None else channels

    # ----------------------------------------------------------------------------------- description

    @property
    def scaled(self) -> bool:
        return self.granularity is not None

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one stored value, without scales (see `bytes_per_sample`)."""
        return np.dtype(self.store_dtype).itemsize

    @property
    def fill_value(self) -> float | int:
        """Fill of never-written chunks: NaN (or its bit pattern), so a hole never reads as data. int8 has
        no NaN; its holes show through the scales' NaN fill."""
        return {
            "float32": float("nan"),
            "float16": float("nan"),
            "bfloat16": 0x7FC0,
            "float8_e4m3fn": 0x7F,
        }.get(self.true_dtype, 0)

    def group_size(self, channels: int) -> int:
        """Channels that share one scale ("group"/"token" granularities)."""
        if self.granularity == "token" or (self.group is not None and channels <= self.group):
            return channels
        if self.group is None or channels % self.group:
            raise SakError(
                f"codec {self.name} needs a channel count divisible by {self.group}, got {channels}; "
                f"use a *_token or *_channel codec for this teacher"
            )
        return self.group

    def scale_shape(self, h: int, w: int, c: int) -> tuple[int, int, int] | None:
        """Per-sample shape of the scales of an (h, w, c) map; None for unscaled codecs."""
        if not self.scaled:
            return None
        if self.granularity == "channel":
            return (1, 1, c)
        if self.granularity == "token_channel":
            return (1, 1, h * w + c)
        return (h, w, c // self.group_size(c))

    def bytes_per_sample(self, h: int, w: int, c: int) -> int:
        """Stored bytes of one (h, w, c) map before lossless compression, scales included (pca<k>: of
        its k coefficients; the basis is stored once per store)."""
        c = self.stored_width(c)
        n = h * w * c * self.bytes_per_value
        shape = self.scale_shape(h, w, c)
        return n + (int(np.prod(shape)) * np.dtype(SCALE_DTYPE).itemsize if shape else 0)

    def describe(self) -> dict:
        """What the codec is, for fingerprints and manifests (enough to decode without this code)."""
        d = {"name": self.name, "values": {"dtype": self.store_dtype, "means": self.true_dtype}}
        if self.scaled:
            d["scales"] = {
                "dtype": SCALE_DTYPE,
                "granularity": self.granularity,
                "group": self.group if self.granularity == "group" else None,
                "qmax": _QMAX[self.true_dtype],
                "dequantize": "float(values) * float(scales), scales broadcast over their group of channels"
                + (" and over H, W" if self.granularity == "channel" else "")
                + (
                    "; token_channel: scales (1, 1, H*W + C) = H*W token scales in (h, w) order, then C "
                    "channel scales; x = values * token_scale[h, w] * channel_scale[c]"
                    if self.granularity == "token_channel"
                    else ""
                ),
            }
        if self.low_rank:
            d["low_rank"] = {
                "rank": self.rank,
                "fit": "per level: channel mean and top-k principal directions of the store's first shard, "
                "float32 features and covariance, float64 eigendecomposition, stored float32; k clipped to C",
                "decode": "x = coefficients @ components + mean; coefficients (..., k) as values decode, "
                "components (k, C), mean (C,)",
            }
        return d

    def identity(self) -> dict:
        """Fields for a store's fingerprint identity beyond its "codec" name: the full spec of a scaled
        codec (so a changed granularity can never reuse a store); nothing for fp32/fp16/bf16, whose
        existing fingerprints stay as they are."""
        return {"codec_spec": self.describe()} if self.scaled or self.low_rank else {}

    # ---------------------------------------------------------------------------------------- encode

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """(..., H, W, C) float tensor -> stored values. Unscaled codecs only (scaled: `encode_parts`)."""
        if self.scaled:
            raise SakError(f"codec {self.name} stores values and scales; call encode_parts(x)")
        return self.encode_parts(x).values

    def encode_parts(self, x: torch.Tensor) -> Encoded:
        """(..., H, W, C) float tensor (any device) -> Encoded numpy values (and scales) on the CPU."""
        import torch

        x = x.detach()
        if not self.scaled:
            if self.true_dtype == "bfloat16":
                return Encoded(x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16), None)
            return Encoded(x.to(getattr(torch, self.true_dtype)).cpu().numpy(), None)
        if x.ndim < 3:
            raise SakError(f"codec {self.name} encodes (..., H, W, C) maps, got shape {tuple(x.shape)}")
        x = x.float()
        c = x.shape[-1]
        if self.granularity == "token_channel":
            return self._encode_token_channel(x)
        if self.granularity == "channel":
            amax = x.abs().amax(dim=(-3, -2), keepdim=True)  # (..., 1, 1, C)
        else:
            g = self.group_size(c)
            amax = x.abs().unflatten(-1, (c // g, g)).amax(-1)  # (..., H, W, G)
        qmax = _QMAX[self.true_dtype]
        scales = (amax / qmax).clamp(_SCALE_MIN, _SCALE_MAX).half()  # round the scale first ...
        if self.granularity == "channel":  # ... then quantise with exactly the stored scale
            y = x / scales.float()  # (..., H, W, C) / (..., 1, 1, C)
        else:
            y = (x.unflatten(-1, (amax.shape[-1], -1)) / scales.float().unsqueeze(-1)).flatten(-2)
        if self.true_dtype == "int8":
            q = y.round_().clamp_(-qmax, qmax).to(torch.int8)
        else:
            q = y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8)
        return Encoded(q.cpu().numpy(), scales.cpu().numpy())

    def _encode_token_channel(self, x: torch.Tensor) -> Encoded:
        """Channel scales (absmax over H, W), then token scales over the channel-scaled map; both rounded to
        float16 before they are used, so decoding needs only the stored arrays."""
        import torch

        qmax = _QMAX[self.true_dtype]
        ch = x.abs().amax(dim=(-3, -2), keepdim=True).clamp(_SCALE_MIN, _SCALE_MAX).half()  # (..., 1, 1, C)
        y = x / ch.float()
        tok = (y.abs().amax(-1, keepdim=True) / qmax).clamp(_SCALE_MIN, _SCALE_MAX).half()  # (..., H, W, 1)
        y = y / tok.float()
        if self.true_dtype == "int8":
            q = y.round_().clamp_(-qmax, qmax).to(torch.int8)
        else:
            q = y.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).view(torch.uint8)
        scales = torch.cat([tok.flatten(-3), ch.flatten(-3)], -1)  # (..., H*W + C)
        return Encoded(q.cpu().numpy(), scales.unsqueeze(-2).unsqueeze(-2).cpu().numpy())

    # ---------------------------------------------------------------------------------------- decode

    def to_torch(
        self, values: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored arrays -> tensors without widening (zero-copy where possible): float32/float16, bf16
        (from uint16 bits), int8, fp8 kept as uint8 bits (torch cannot concatenate float8 on the CPU)."""
        import torch

        if isinstance(values, np.ndarray):
            values = np.ascontiguousarray(values)
            if self.true_dtype == "bfloat16":
                values = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
            else:
                values = torch.from_numpy(values)
        elif self.true_dtype == "bfloat16" and values.dtype != torch.bfloat16:
            values = values.view(torch.int16).view(torch.bfloat16)  # uint16 or int16 bits
        if isinstance(scales, np.ndarray):
            scales = torch.from_numpy(np.ascontiguousarray(scales))
        if self.scaled and scales is None:
            raise SakError(f"codec {self.name} needs its scales to decode")
        return values, scales

    def decode_torch(
        self,
        values: np.ndarray | torch.Tensor,
        scales: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Stored values (and scales) -> (..., H, W, C) `dtype` (default float32) on `device`. One byte per
        value crosses to the device for int8/fp8; the dequantising multiply runs there."""
        import torch

        dtype = torch.float32 if dtype is None else dtype

        v, s = self.to_torch(values, scales)
        v = v.to(device, non_blocking=True) if device is not None else v
        if self.true_dtype == "float8_e4m3fn":
            if v.device.type == "cpu":  # note: a 256-entry table lookup is ~2x faster than torch's CPU cast
                x = torch.from_numpy(_fp8_table()[v.view(torch.uint8).numpy()]).to(dtype)
            else:
                x = v.view(torch.float8_e4m3fn).to(dtype)
        else:
            x = v.to(dtype)
        if not self.scaled:
            return x
        s = s.to(device, non_blocking=True) if device is not None else s
        s = s.to(dtype)
        if self.granularity == "channel":
            return x.mul_(s)  # (..., H, W, C) * (..., 1, 1, C)
        if self.granularity == "token_channel":
            h, w, c = x.shape[-3:]
            tok = s[..., 0, 0, : h * w].unflatten(-1, (h, w, 1))  # (..., H, W, 1)
            return x.mul_(tok).mul_(s[..., :, :, h * w :])  # ... * (..., 1, 1, C)
        c = x.shape[-1]
        g = self.group_size(c)
        return x.unflatten(-1, (c // g, g)).mul_(s.unsqueeze(-1)).flatten(-2)  # (..., H, W, G, g) * (..., 1)

    def decode(self, values: np.ndarray | torch.Tensor, scales: np.ndarray | None = None) -> torch.Tensor:
        """Stored values (and scales) -> float32 (..., H, W, C) tensor on the CPU."""
        return self.decode_torch(values, scales, device=None)


def refuse_overflow(codec: Codec, x: torch.Tensor, teacher: str, block: int) -> None:
    """An fp16 store cannot hold |x| > 65504 (it would store inf): refuse at extraction, one line. (pca<k>:
    its coefficients are checked when encoded.)"""
    if codec.true_dtype != "float16" or codec.low_rank:
        return
    amax = float(x.detach().abs().amax()) if x.numel() else 0.0
    if amax > 65504 or amax != amax:
        raise SakError(
            f"teacher {teacher} level {block}: a feature value of magnitude {amax:.4g} does not fit float16 "
            f"(largest finite 65504); extract this teacher with --codec bf16 (same size, float32's range) or "
            f"--codec fp8 (scaled per group)"
        )


_FP8_TABLE: list[np.ndarray] = []


def _fp8_table() -> np.ndarray:
    """float32 value of every e4m3fn bit pattern (NaN for 0x7F/0xFF)."""
    import torch

    if not _FP8_TABLE:
        bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _FP8_TABLE.append(bits.view(torch.float8_e4m3fn).float().numpy())
    return _FP8_TABLE[0]


# ------------------------------------------------------------------------------------------- registry

CODECS: Registry[Codec] = Registry("codec")

CODECS.add("fp32", Codec("fp32", "float32", "float32"))
CODECS.add("fp16", Codec("fp16", "float16", "float16"))
CODECS.add("bf16", Codec("bf16", "uint16", "bfloat16"))
for _g in (32, 128):
    CODECS.add(f"int8_group{_g}", Codec(f"int8_group{_g}", "int8", "int8", "group", _g, "noshuffle"))
CODECS.add("int8_token", Codec("int8_token", "int8", "int8", "token", None, "noshuffle"))
CODECS.add("int8_channel", Codec("int8_channel", "int8", "int8", "channel", None, "noshuffle"))
# A store recorded as `int8` (older caches) is per group of 32 channels; describe() records the granularity.
# New caches never get this name: `--codec int8` is int8_tc (OPTION_ALIASES).
CODECS.add("int8", Codec("int8", "int8", "int8", "group", 32, "noshuffle"))
CODECS.add("fp8", Codec("fp8", "uint8", "float8_e4m3fn", "group", 32, "noshuffle"))
CODECS.add("fp8_token", Codec("fp8_token", "uint8", "float8_e4m3fn", "token", None, "noshuffle"))
# int8 robust to massive channels and high-norm tokens: one scale per channel and one per token
CODECS.add("int8_tc", Codec("int8_tc", "int8", "int8", "token_channel", None, "noshuffle"))


def codec_names() -> list[str]:
    """The registered codecs (pca<k> and pca<k>-fp8 are a family, built from the name: `get_codec`)."""
    return CODECS.names()


_PCA = re.compile(r"pca(\d+)(?:-(\w+))?")
PCA_COEFFICIENTS = {"fp16": "fp16", "fp8": "fp8_token"}  # pca<k>[-x]: x -> the codec of the coefficients


def pca_codec(name: str) -> Codec | None:
    """`pca<k>` (float16 coefficients) or `pca<k>-fp8` (float8 e4m3 coefficients, one float16 scale per
    token); None for a name that is not pca<k>. The values are the coefficients, encoded by the named
    coefficient codec; the basis is the store's (lowrank.py)."""
    m = _PCA.fullmatch(name)
    if m is None:
        return None
    k, coeffs = int(m.group(1)), m.group(2) or "fp16"
    if k < 1:
        raise SakError(f"codec {name}: pca<k> needs k >= 1 (e.g. pca64)")
    if coeffs not in PCA_COEFFICIENTS:
        raise SakError(
            f"codec {name}: pca coefficients are stored as fp16 (pca{k}) or fp8 (pca{k}-fp8), not {coeffs}; "
            f"int8 and the other codecs do not combine with pca"
        )
    return dataclasses.replace(CODECS.get(PCA_COEFFICIENTS[coeffs]), name=name, rank=k)


CODECS.add_family("pca<k>, pca<k>-fp8", pca_codec)


def get_codec(name: str) -> Codec:
    """The codec `name` as a store records it: registered, or of the pca<k> family (unknown: a SakError
    listing the known ones)."""
    return CODECS.get(name)


# What a name given as an option means, where it differs from the recorded name: the plain `int8` is the
# int8 that keeps outlier channels (per group of 32 channels loses them: standardised 1st-percentile
# cosine 0.954 at channels x300, against 0.9996 for int8_tc, bench/codecs.py). Caches that recorded
# "int8" keep reading as they were written (get_codec).
OPTION_ALIASES = {"int8": "int8_tc"}


def codec_option(name: str) -> Codec:
    """The codec a `--codec` option (or a config field from a script) asks for."""
    return get_codec(OPTION_ALIASES.get(name, name))


# ------------------------------------------------------------------------------------ test features


def outlier_features(
    n: int,
    h: int,
    w: int,
    c: int,
    seed: int = 0,
    outlier_channels: int = 3,
    high_norm_tokens: float = 0.015,
    magnitude: float = 100.0,
) -> torch.Tensor:
    """Synthetic ViT-like features (n, h, w, c) float32 for codec tests and benchmarks: Gaussian tokens
    with per-channel offsets, a few channels x magnitude/2 .. x magnitude (massive activations: real
    CLIP-L/DINOv2-L channels reach hundreds of times the typical one) and ~1.5% of tokens with 10x the norm
    (high-norm "register" tokens). Plain Gaussian noise hides exactly what breaks quantisers."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, w, c, generator=g) + 0.5 * torch.randn(c, generator=g)  # (n, h, w, c)
    channels = torch.randperm(c, generator=g)[:outlier_channels]
    x[..., channels] *= magnitude * (0.5 + 0.5 * torch.rand(outlier_channels, generator=g))
    tokens = torch.rand(n, h, w, generator=g) < high_norm_tokens  # (n, h, w)
    x[tokens] *= 10
    return x
