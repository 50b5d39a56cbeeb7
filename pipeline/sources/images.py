"""Checking and decoding image bytes (only BadImage(reason) ever escapes for bad bytes), and cutting a
view out of the decoded pixels (`cut_view`, the one resize of extraction, the loader and stage 2).

Decoding never applies the EXIF orientation: crop boxes of the view plan are in stored-pixel
coordinates, and the same bytes must give the same pixels on every machine. `check_image` reports the
orientation tag so that ingest can record how many images carry one. Multi-frame files (animated GIF,
multi-page TIFF) give their first frame.

Two guards keep a decompression bomb from being allocated, both read from the header before any pixel
is decoded: the pixel count (`max_pixels`), and, for large images, the decoded RGB size per byte of file
(`max_decode_ratio`: a 420 KB PNG of 12000x12000 would decode to 432 MB, a ratio of about 1000; photos
are 3-30, flat drawings rarely past 100).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from sak.pipeline.base.errors import BadImage, one_line
from sak.pipeline.sources.limits import (
    DEFAULT_MAX_DECODE_RATIO,
    DEFAULT_MAX_PIXELS,
    RATIO_FLOOR_PIXELS,
)

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # PIL format name, e.g. "JPEG"
    orientation: int = 1  # the EXIF orientation tag (1: none or upright); never applied


def check_image(
    data: bytes,
    *,
    min_side: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_ratio: float = DEFAULT_MAX_DECODE_RATIO,
) -> ImageInfo:
    """Prove the bytes decode fully, cheaply; raise BadImage(reason) otherwise.

    The pixel count and decode ratio are checked from the header before any decoding (a decompression
    bomb is never allocated). JPEGs decode at 1/8 scale via draft(): libjpeg still walks the whole
    entropy-coded stream, so truncation is caught at a fraction of the cost. Returns the stored (header)
    size and the EXIF orientation tag.
    """
    with _guarded():
        im = _open(data, max_pixels)
        with im:
            width, height = im.size
            if min(width, height) < min_side:
                raise BadImage(f"too small: {width}x{height}, the shorter side must be >= {min_side} px")
            _check_ratio(width, height, len(data), max_decode_ratio)
            orientation = _orientation(im)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            _load(im)
            return ImageInfo(width, height, im.format or "unknown", orientation)


def _check_ratio(width: int, height: int, nbytes: int, max_ratio: float) -> None:
    if width * height <= RATIO_FLOOR_PIXELS:
        return
    ratio = 3 * width * height / max(1, nbytes)
    if ratio > max_ratio:
        raise BadImage(
            f"decompression ratio {ratio:.0f}x: {width}x{height} from {nbytes} bytes would decode to "
            f"{3 * width * height / 2**20:.0f} MiB > max_decode_ratio={max_ratio:g}"
        )


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Full decode to 8-bit RGB, in stored-pixel orientation (EXIF orientation is NOT applied).

    Transparent pixels are composited onto white (their stored colour is undefined; this is what
    viewers and the CLIP/HF processors do); 16-bit greyscale is scaled to 8 bits (PIL's convert
    would clip it); palette, CMYK, greyscale and 1-bit go through PIL's convert.
    """
    with _guarded():
        im = _open(data, max_pixels)
        _load(im)
        try:
            return _to_rgb(im)
        except (ValueError, OSError) as exc:
            raise BadImage(f"cannot convert mode {im.mode} to RGB ({one_line(exc)})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")  # 65535 -> 255
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


@contextmanager
def _guarded() -> Iterator[None]:
    """Bad bytes surface only as BadImage. Our max_pixels check replaces PIL's
    DecompressionBombWarning (PIL warns at half its hard limit, which the default max_pixels allows).
    Note: warning filters are process-wide, so a concurrent thread may briefly see them changed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except BadImage:
            raise
        except Exception as exc:  # any other plugin failure is still "these bytes are not usable"
            raise BadImage(f"not a decodable image ({one_line(exc)})") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open plus the pixel limit, before any pixel is decoded."""
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadImage(_bomb_reason(data, max_pixels)) from None
    except UnidentifiedImageError:
        raise BadImage("not a decodable image (cannot identify image file)") from None
    except Exception as exc:  # plugins raise SyntaxError, struct.error, ValueError... for bad headers
        raise BadImage(f"not a decodable image ({one_line(exc)})") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise BadImage(f"too many pixels: {width}x{height} > max_pixels={max_pixels}")
    return im


def _bomb_reason(data: bytes, max_pixels: int) -> str:
    """PIL refused at its own hard limit before handing us the image: read the header size through
    the format's plugin (no bomb check there, and no pixel decoded) to name it."""
    limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)) or max_pixels  # PIL's cap wins
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept and not accept(data[:16]):
                continue
            width, height = factory(io.BytesIO(data), "").size
            return f"too many pixels: {width}x{height} > max_pixels={limit}"
        except Exception:  # only naming the size: any plugin failure means "try the next format"
            continue
    return f"too many pixels: more than max_pixels={limit}"


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as exc:  # OSError "image file is truncated", SyntaxError "broken PNG file", ...
        raise BadImage(f"truncated or corrupt image data: {one_line(exc)}") from None


def decode_image(data: bytes) -> torch.Tensor:
    """Stored bytes -> (3, H, W) uint8 RGB (no EXIF rotation: boxes are in stored-pixel coordinates)."""
    img = decode_rgb(data)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def cut_view(
    image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, size: tuple[int, int]
) -> torch.Tensor:
    """THE resize function, shared by extraction and training: crop, resize, flip, round to uint8.

    image: (3, H, W) uint8 source pixels. box: (x0, y0, x1, y1) half-open. size: (h, w) output.
    Resizing is bicubic with antialias (so downscaling does not alias), computed in float32 on the CPU,
    clamped to [0, 255] and rounded to uint8, as a pipeline that stores pixels would. Returns (3, h, w)
    uint8. Every consumer of a view (teachers at extraction, the student in training, online teachers)
    calls this function, so they see identical pixels.
    """
    x0, y0, x1, y1 = box
    crop = image[:, y0:y1, x0:x1].unsqueeze(0).float()  # (1, 3, h0, w0)
    if crop.shape[-2:] != torch.Size(size):
        crop = F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False)
    if flip:
        crop = crop.flip(-1)
    return crop.clamp_(0, 255).round_().to(torch.uint8)[0]
