"""Stage-2 augmentation (training) and padding (evaluation) of dense multi-task samples.

A sample is the dict `DenseDataset.load` gives: {"name", "image" (3, H, W) uint8, "labels" {task: tensor},
"size" (h, w)} (dense.py describes the label tensors).

Training (paper B.3; the protocol of innovator-zero/SAK datasets/custom_transforms.py, itself that of
MTI-Net / InvPT): random scale in [0.5, 2.0] (image bicubic, labels nearest; depth divided by the scale, as
SAK's RandomScaling does: a closer view of the scene), pad right/bottom to the crop size (labels 255, normals
and depth 0, image 0), random crop, horizontal flip with the normals' x component negated, photometric
distortion (brightness, contrast, saturation, hue; each with probability 1/2, contrast before or after the
colour jitter, as mmseg's PhotoMetricDistortion), and then the references' AddIgnoreRegions rule for human
parts: a crop that holds no part pixel (only background or ignore) becomes all-ignore, so a crop without a
person does not train the parsing head as background. Every random choice comes from
`augment_plan(seed, name, epoch, ...)`, drawn with the project's SplitMix64 (`ViewSampler`) in a fixed
order, so a plan is replayable on any machine (what a stage-2 cache records). The plan and the augmented
image depend on the image alone, never on its labels.

Evaluation (SAK datasets/custom_transforms.py PadImage + evaluation/evaluate_utils.py predict): the whole
image, no resize, centre-padded to the dataset's evaluation size (a larger image to its own size, rounded
up to the patch multiple); labels padded with their ignore values; predictions are cropped back to the
image before any metric (`EvalPad` records where the image sits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sak.pipeline.sources.images import cut_view
from sak.pipeline.sources.views import ViewSampler, view_seed
from sak.pipeline.teachers.forward import IMAGENET_MEAN

IGNORE_INDEX = 255
# photometric distortion (mmseg PhotoMetricDistortion defaults)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0 / 180.0  # OpenCV hue units of 0..180 -> fraction of the hue circle
# The references pad the evaluation image after normalisation with 0, i.e. with the mean colour; the
# nearest uint8 colour (within half a grey level of it) stands in for it here.
EVAL_PAD_COLOUR = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
PATCH_MULTIPLE = 16  # an evaluation input larger than the dataset's size is rounded up to this


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class AugmentPlan:
    """Every random choice for one training sample. None: that photometric step is skipped."""

    scale: float
    flip: bool
    crop_y: int  # top-left of the crop in the scaled (and padded) image
    crop_x: int
    brightness: float | None  # added to every channel (0..255 units)
    contrast: float | None  # multiplies every channel
    saturation: float | None  # multiplies the HSV saturation
    hue: float | None  # added to the HSV hue (fraction of the circle)
    contrast_first: bool  # contrast before (True) or after the colour jitter


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def augment_plan(
    seed: int,
    name: str,
    epoch: int,
    height: int,
    width: int,
    crop: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    photometric: bool = True,
) -> AugmentPlan:
    """The plan of sample `name` in `epoch` for a (height, width) image: pure function of its arguments.

    Draw order (fixed; every draw is always made so the stream never shifts): scale, flip, crop y, crop x,
    then for brightness, contrast, saturation, hue an (apply?, value) pair each, then contrast_first.
    """
    rng = ViewSampler(view_seed(seed, name, epoch))
    scale = rng.uniform(*scale_range)
    flip = rng.uniform(0.0, 1.0) < 0.5
    sh, sw = scaled_size(height, width, scale)
    crop_y = rng.randint(0, max(sh, crop[0]) - crop[0])
    crop_x = rng.randint(0, max(sw, crop[1]) - crop[1])
    draws = []
    for low, high in (
        (-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA),
        CONTRAST_RANGE,
        SATURATION_RANGE,
        (-HUE_DELTA, HUE_DELTA),
    ):
        apply, value = rng.uniform(0.0, 1.0) < 0.5, rng.uniform(low, high)
        draws.append(value if (apply and photometric) else None)
    contrast_first = rng.uniform(0.0, 1.0) < 0.5
    return AugmentPlan(scale, flip, crop_y, crop_x, *draws, contrast_first)


# ----------------------------------------------------------------------------------------------
# label rules shared by training and evaluation


def pad_value(task: str) -> float:
    return 0.0 if task in ("normals", "depth") else IGNORE_INDEX


def ignore_partless(parts: torch.Tensor) -> torch.Tensor:
    """Human parts (H, W): a map holding no part pixel (only 0 = background and 255) -> all 255.

    The references' AddIgnoreRegions, applied to the final (cropped or padded) map, not to the image."""
    if bool(((parts == 0) | (parts == IGNORE_INDEX)).all()):
        return torch.full_like(parts, IGNORE_INDEX)
    return parts


def _finish_labels(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "human_parts" in labels:
        labels["human_parts"] = ignore_partless(labels["human_parts"])
    return labels


# ----------------------------------------------------------------------------------------------
# applying a plan


def _resize_label(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) or (H, W) any dtype -> nearest-neighbour resize to size (h, w), same dtype."""
    squeeze = x.dim() == 2
    y = x[None, None] if squeeze else x[None]
    if y.shape[-2:] != torch.Size(size):
        y = F.interpolate(y.float(), size=size, mode="nearest-exact").to(x.dtype)
    return y[0, 0] if squeeze else y[0]


def _pad_crop(x: torch.Tensor, top: int, left: int, size: tuple[int, int], value: float) -> torch.Tensor:
    """(..., H, W): pad right/bottom with value as far as the window needs, then take the size window."""
    h, w = x.shape[-2:]
    ph, pw = max(0, top + size[0] - h), max(0, left + size[1] - w)
    if ph or pw:
        flat = x.dim() == 2
        y = F.pad(x[None] if flat else x, (0, pw, 0, ph), value=value)
        x = y[0] if flat else y
    return x[..., top : top + size[0], left : left + size[1]]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> HSV in [0, 1]."""
    r, g, b = rgb
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = [
        torch.stack([v, t, p]),
        torch.stack([q, v, p]),
        torch.stack([p, v, t]),
        torch.stack([p, q, v]),
        torch.stack([t, p, v]),
        torch.stack([v, p, q]),
    ]
    out = torch.zeros_like(hsv)
    for k, c in enumerate(choices):
        out = torch.where((i == k)[None], c, out)
    return out


def photometric_distort(image: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
    """(3, H, W) uint8 -> uint8 with the plan's brightness / contrast / saturation / hue applied."""
    if plan.brightness is None and plan.contrast is None and plan.saturation is None and plan.hue is None:
        return image
    x = image.float()  # 0..255
    if plan.brightness is not None:
        x = (x + plan.brightness).clamp(0, 255)
    if plan.contrast is not None and plan.contrast_first:
        x = (x * plan.contrast).clamp(0, 255)
    if plan.saturation is not None or plan.hue is not None:
        hsv = _rgb_to_hsv(x / 255.0)
        if plan.saturation is not None:
            hsv[1] = (hsv[1] * plan.saturation).clamp(0, 1)
        if plan.hue is not None:
            hsv[0] = (hsv[0] + plan.hue) % 1.0
        x = _hsv_to_rgb(hsv) * 255.0
    if plan.contrast is not None and not plan.contrast_first:
        x = (x * plan.contrast).clamp(0, 255)
    return x.clamp(0, 255).round().to(torch.uint8)


def apply_plan(sample: dict, plan: AugmentPlan, crop: tuple[int, int]) -> dict:
    """Scale, pad, crop, flip (normals x negated), photometric: a training sample of size `crop`.

    Labels: depth divided by the scale; human parts all-ignore when the crop holds no part pixel.
    """
    image = sample["image"]  # (3, H, W) uint8
    h, w = image.shape[-2:]
    size = scaled_size(h, w, plan.scale)
    image = cut_view(image, (0, 0, w, h), False, size)  # bicubic + antialias, uint8 (the project's resize)
    image = _pad_crop(image, plan.crop_y, plan.crop_x, crop, 0.0)
    labels = {}
    for task, x in sample["labels"].items():
        x = _resize_label(x, size)
        if task == "depth":
            x = x / plan.scale  # (1, h, w) metres: the scene seen s times closer; 0 (missing) stays 0
        x = _pad_crop(x, plan.crop_y, plan.crop_x, crop, pad_value(task))
        if plan.flip:
            x = x.flip(-1)
            if task == "normals":
                x = torch.cat([-x[:1], x[1:]])  # mirror image: the x component changes sign
        labels[task] = x.contiguous()
    if plan.flip:
        image = image.flip(-1)
    image = photometric_distort(image.contiguous(), plan)
    valid_h, valid_w = min(crop[0], size[0] - plan.crop_y), min(crop[1], size[1] - plan.crop_x)
    return {
        "name": sample["name"],
        "image": image,
        "labels": _finish_labels(labels),
        "size": (valid_h, valid_w),
    }


# ----------------------------------------------------------------------------------------------
# evaluation padding


@dataclass(frozen=True)
class EvalPad:
    """Where the whole image sits in the padded evaluation input: rows top..top+height, cols left..left+width."""

    top: int
    left: int
    height: int
    width: int

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, W) padded map -> (..., height, width) of the image."""
        return x[..., self.top : self.top + self.height, self.left : self.left + self.width]


def eval_input_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The padded input of a (height, width) image: the dataset's size, or larger images' own size
    rounded up to the patch multiple (the references' PadImage never shrinks an image)."""

    def side(n: int, target: int) -> int:
        return target if n <= target else -(-n // PATCH_MULTIPLE) * PATCH_MULTIPLE

    return side(height, size[0]), side(width, size[1])


def _pad_centre(x: torch.Tensor, pad: EvalPad, size: tuple[int, int], value) -> torch.Tensor:
    """(C, h, w) or (h, w) -> (C, H, W) / (H, W) of `size` with x at pad.top, pad.left, the rest `value`."""
    out = torch.empty((*x.shape[:-2], *size), dtype=x.dtype)
    if isinstance(value, tuple):  # one value per channel
        out[:] = torch.tensor(value, dtype=x.dtype).view(-1, 1, 1)
    else:
        out.fill_(value)
    pad.crop(out).copy_(x)
    return out


def pad_for_eval(sample: dict, size: tuple[int, int]) -> dict:
    """Centre-pad a whole sample to the evaluation input (no resize): image with the mean colour, labels
    with their ignore values (human parts without a part pixel: all ignore). Adds "pad" (EvalPad);
    "size" stays the image's (h, w)."""
    image = sample["image"]
    h, w = image.shape[-2:]
    full = eval_input_size(h, w, size)
    pad = EvalPad((full[0] - h) // 2, (full[1] - w) // 2, h, w)  # the references' delta // 2
    labels = {t: _pad_centre(x, pad, full, pad_value(t)) for t, x in sample["labels"].items()}
    out = {
        **sample,
        "image": _pad_centre(image, pad, full, EVAL_PAD_COLOUR),
        "labels": _finish_labels(labels),
    }
    out.update(size=(h, w), pad=pad)
    return out
