"""Target codecs: how a float32 feature map becomes stored values and back.

Registered by name and recorded in each store's fingerprint. A codec only maps values; the store adds
lossless Blosc-zstd byte-shuffle compression on top.
  fp32  exact (for equivalence tests), 4 bytes/value
  fp16  the default, 2 bytes/value
  bf16  bfloat16 kept as its uint16 bit pattern (Zarr and .npy have no bfloat16), true dtype in attributes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sak.pipeline.errors import SakError


@dataclass(frozen=True)
class Codec:
    name: str
    store_dtype: str  # numpy dtype of the stored array
    true_dtype: str  # the dtype the values mean
    encode: Callable[[torch.Tensor], np.ndarray]  # float tensor -> stored numpy array
    decode: Callable[[np.ndarray], torch.Tensor]  # stored numpy array -> float32 tensor

    @property
    def bytes_per_value(self) -> int:
        return np.dtype(self.store_dtype).itemsize


def _bf16_encode(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_decode(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()


_CODECS: dict[str, Codec] = {
    "fp32": Codec(
        "fp32",
        "float32",
        "float32",
        lambda x: x.float().numpy(),
        lambda a: torch.from_numpy(np.asarray(a, np.float32)),
    ),
    "fp16": Codec(
        "fp16",
        "float16",
        "float16",
        lambda x: x.half().numpy(),
        lambda a: torch.from_numpy(np.asarray(a)).float(),
    ),
    "bf16": Codec("bf16", "uint16", "bfloat16", _bf16_encode, _bf16_decode),
}


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise SakError(f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}")
    return _CODECS[name]
