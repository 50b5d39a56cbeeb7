"""Dense multi-task datasets for stage 2 (PASCAL-Context, NYUD-v2, a plain folder) and their augmentation.

Every layout loads into one in-memory form (what the losses in task_losses.py and the meters in
metrics.py take):

    image                   (3, H, W) uint8 RGB
    semseg, human_parts     (H, W) int64 class ids, 255 = ignore
    sal, edge               (H, W) uint8 in {0, 1}, 255 = ignore
    normals                 (3, H, W) float32 unit vectors (x right, y, z), all-zero = invalid
    depth                   (1, H, W) float32 metres, 0 = invalid

Files read (the releases of the multi-task dense-prediction literature: ATRC / MTI-Net / InvPT):

    PASCAL_MT/   (--data-root may name PASCAL_MT itself or its parent)
      ImageSets/Context/{train,val}.txt     one image id per line
      JPEGImages/<id>.jpg                   the image
      semseg/pascal-context/<id>.png        class ids 0..20 as stored (0 = background), 255 kept as ignore
      human_parts/<id>.png                  class ids 0..6 as stored, or
      human_parts/<id>.mat                  Pascal-Part annotation (scipy.io.loadmat, never pickle):
                                            anno.objects[i] with class_ind 15 (person) and parts[j] =
                                            (part_name, mask); part names merge into 6 parts: head 1,
                                            torso 2, upper arms 3, lower arms + hands 4, upper legs 5,
                                            lower legs + feet 6, the rest of the image 0. An image with
                                            no such file or no person with parts: all 255 (ignored)
      sal_distill/<id>.png                  saliency: value / 255 > 0.5 -> 1, else 0
      normals_distill/<id>.png              normals: 2 * value / 255 - 1 per channel (or <id>.npy HxWx3)
      pascal-context/trainval/<id>.mat      boundaries: LabelMap (loadmat) -> |3x3 Laplacian| > 0,
                                            thinned (skimage), as MTI-Net derives them; or edge/<id>.png
    NYUD_MT/     (--data-root may name NYUD_MT itself or its parent)
      gt_sets/{train,val}.txt               one image id per line
      images/<id>.jpg|png                   the image
      segmentation/<id>.png                 stored 0 = void, 1..40 classes -> value - 1, void -> 255
      depth/<id>.npy                        float metres (0 = missing); or <id>.png in millimetres (uint16)
      normals/<id>.png                      2 * value / 255 - 1 (or <id>.npy float HxWx3 in [-1, 1])
      edge/<id>.png                         value / 255 > 0.5 -> 1 (or <id>.npy with 0/1)
    a folder (your own data, --dataset folder):
      DIR/train.txt, DIR/val.txt            names, one per line
      DIR/images/<name>.jpg|png
      DIR/<task>/<name>.png|npy             semseg, human_parts: uint8 ids, 255 = ignore;
                                            sal, edge: uint8 masks 0/255 or 0/1 (> 0.5 of the max -> 1);
                                            normals: float32 .npy HxWx3; depth: float32 .npy metres, 0 = invalid
      DIR/classes.json (optional)           {"semseg": K, "human_parts": K}; otherwise max id + 1 over
                                            the training labels

Training augmentation (paper B.3, the protocol of Maninis et al. 2019 / InvPT): random scale in [0.5, 2.0]
(image bicubic, labels nearest), pad right/bottom to the crop size (labels 255, normals and depth 0,
image 0), random crop (512x512 PASCAL, 448x576 NYUD), horizontal flip with the normals' x component
negated, and photometric distortion (brightness, contrast, saturation, hue; each with probability 1/2,
contrast before or after the colour jitter, as mmseg's PhotoMetricDistortion). Every random choice comes
from `augment_plan(seed, name, epoch, ...)`, drawn with the project's SplitMix64 (`ViewSampler`) in a
fixed order, so a plan is replayable on any machine (what a stage-2 cache records: stage2_views.py).
Evaluation pads right/bottom to the input size without resizing; `size` gives the unpadded (h, w).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sak.pipeline.base.errors import SakError
from sak.pipeline.sources.images import cut_view
from sak.pipeline.sources.views import ViewSampler, view_seed
from sak.student.data.dense_sets import (  # noqa: F401  (parse_img_size: the stage-2 cache builder's import)
    DATASET_METRIC_NAME,
    DATASETS,
    DEFAULT_INPUT_SIZE,
    parse_img_size,
)
from sak.student.model.multitask import NYUD_TASKS, PASCAL_CONTEXT_TASKS

IGNORE_INDEX = 255


FOLDER_TASKS = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
FIXED_OUTPUTS = {"sal": 1, "normals": 3, "edge": 1, "depth": 1}
CLASS_TASKS = ("semseg", "human_parts")
PERSON_CLASS = 15  # VOC class index of "person" in the Pascal-Part annotation
HUMAN_PART_IDS = {  # Pascal-Part names -> the 6 parts of the multi-task literature (0 = background)
    **dict.fromkeys(["head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair"], 1),
    **dict.fromkeys(["torso", "neck"], 2),
    **dict.fromkeys(["luarm", "ruarm"], 3),
    **dict.fromkeys(["llarm", "rlarm", "lhand", "rhand"], 4),
    **dict.fromkeys(["luleg", "ruleg"], 5),
    **dict.fromkeys(["llleg", "rlleg", "lfoot", "rfoot"], 6),
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

# photometric distortion (mmseg PhotoMetricDistortion defaults)
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0 / 180.0  # OpenCV hue units of 0..180 -> fraction of the hue circle


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
# applying a plan


def _resize_label(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) or (H, W) any dtype -> nearest-neighbour resize to size (h, w), same dtype."""
    squeeze = x.dim() == 2
    y = x[None, None] if squeeze else x[None]
    if y.shape[-2:] != torch.Size(size):
        y = F.interpolate(y.float(), size=size, mode="nearest-exact").to(x.dtype)
    return y[0, 0] if squeeze else y[0]


def pad_value(task: str) -> float:
    return 0.0 if task in ("normals", "depth") else IGNORE_INDEX


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
    """Scale, pad, crop, flip (normals x negated), photometric: a training sample of size `crop`."""
    image = sample["image"]  # (3, H, W) uint8
    h, w = image.shape[-2:]
    size = scaled_size(h, w, plan.scale)
    image = cut_view(image, (0, 0, w, h), False, size)  # bicubic + antialias, uint8 (the project's resize)
    image = _pad_crop(image, plan.crop_y, plan.crop_x, crop, 0.0)
    labels = {}
    for task, x in sample["labels"].items():
        x = _pad_crop(_resize_label(x, size), plan.crop_y, plan.crop_x, crop, pad_value(task))
        if plan.flip:
            x = x.flip(-1)
            if task == "normals":
                x = torch.cat([-x[:1], x[1:]])  # mirror image: the x component changes sign
        labels[task] = x.contiguous()
    if plan.flip:
        image = image.flip(-1)
    image = photometric_distort(image.contiguous(), plan)
    valid_h, valid_w = min(crop[0], size[0] - plan.crop_y), min(crop[1], size[1] - plan.crop_x)
    return {"name": sample["name"], "image": image, "labels": labels, "size": (valid_h, valid_w)}


def pad_for_eval(sample: dict, size: tuple[int, int]) -> dict:
    """Pad right/bottom to `size` (no resize): labels with their ignore value. `size` key: the original."""
    image = sample["image"]
    h, w = image.shape[-2:]
    if h > size[0] or w > size[1]:
        raise SakError(
            f"image {sample['name']} is {h}x{w}, larger than the {size[0]}x{size[1]} input; evaluation pads "
            f"without resizing: pass a larger --img-size"
        )
    labels = {t: _pad_crop(x, 0, 0, size, pad_value(t)) for t, x in sample["labels"].items()}
    return {
        "name": sample["name"],
        "image": _pad_crop(image, 0, 0, size, 0.0),
        "labels": labels,
        "size": (h, w),
    }


# ----------------------------------------------------------------------------------------------
# reading files


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def _find(folder: Path, name: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        p = folder / f"{name}{ext}"
        if p.exists():
            return p
    return None


def _class_ids(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:
        x = x[..., 0]
    return torch.from_numpy(x.astype(np.int64))


def _binary(x: np.ndarray) -> torch.Tensor:
    """A mask stored 0/255, 0/1 (or float) -> uint8 {0, 1}; 255 stays ignore only when the mask is 0/1/255."""
    if x.ndim == 3:
        x = x[..., 0]
    x = x.astype(np.float32)
    values = set(np.unique(x).tolist())
    if values <= {0.0, 1.0, 255.0} and 1.0 in values:  # 0/1 masks with 255 ignore
        out = np.where(x == 255, IGNORE_INDEX, x)
    else:
        top = 255.0 if x.max() > 1 else 1.0
        out = (x / top > 0.5).astype(np.float32)
    return torch.from_numpy(out.astype(np.uint8))


def _normals_png(x: np.ndarray) -> torch.Tensor:
    n = 2.0 * x[..., :3].astype(np.float32) / 255.0 - 1.0  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))


def _normals_npy(x: np.ndarray) -> torch.Tensor:
    if x.ndim != 3 or 3 not in (x.shape[-1], x.shape[0]):
        raise SakError(f"normals .npy must be HxWx3, got {x.shape}")
    n = x if x.shape[0] == 3 and x.shape[-1] != 3 else x.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(n.astype(np.float32)))


def _depth(x: np.ndarray, from_png: bool) -> torch.Tensor:
    d = x.astype(np.float32)
    if d.ndim == 3:
        d = d[..., 0]
    if from_png:
        d = d / 1000.0  # uint16 millimetres
    return torch.from_numpy(np.nan_to_num(d, nan=0.0))[None]  # (1, H, W)


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """MTI-Net's boundaries: |3x3 Laplacian| > 0 of the PASCAL-Context label map, thinned -> uint8 0/1."""
    from scipy.ndimage import convolve
    from skimage.morphology import thin

    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    lap = convolve(label_map.astype(np.float64), kernel, mode="mirror")  # cv2's BORDER_REFLECT_101
    return thin(np.abs(lap) > 0).astype(np.uint8)


def human_parts_from_mat(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Pascal-Part .mat -> (H, W) uint8 part ids 0..6, or all 255 when no person has parts."""
    from scipy.io import loadmat

    anno = loadmat(str(path))["anno"][0, 0]
    objects = anno["objects"][0]
    target = None
    for obj in objects:
        cls = int(np.asarray(obj["class_ind"]).ravel()[0])
        parts = np.asarray(obj["parts"])
        if cls != PERSON_CLASS or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(shape, np.uint8)
        for part in parts.ravel():
            name = str(np.asarray(part["part_name"]).ravel()[0])
            if name not in HUMAN_PART_IDS:
                raise SakError(f"{path}: unknown human part {name!r}")
            target[np.asarray(part["mask"]).astype(bool)] = HUMAN_PART_IDS[name]
    return np.full(shape, IGNORE_INDEX, np.uint8) if target is None else target


# ----------------------------------------------------------------------------------------------
# the datasets


def _read_names(path: Path) -> list[str]:
    if not path.exists():
        raise SakError(f"split file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise SakError(f"split file {path} lists no images")
    return names


def _resolve_root(root: Path, folder: str) -> Path:
    return root / folder if (root / folder).is_dir() else root


class DenseDataset(torch.utils.data.Dataset):
    """One split of a dense multi-task dataset: `load(i)` -> {"name", "image", "labels", "size"}.

    dataset: "pascal", "nyud" or "folder"; tasks: a subset of the dataset's tasks (default: all).
    `outputs` gives each task's output channels (classes for semseg / human_parts).
    """

    def __init__(self, dataset: str, root: str | Path, split: str, tasks: Sequence[str] = ()) -> None:
        if dataset not in DATASETS:
            raise SakError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        self.dataset, self.split = dataset, split
        root = Path(root).expanduser()
        if not root.is_dir():
            raise SakError(f"--data-root {root} is not a folder")
        if dataset == "pascal":
            self.root = _resolve_root(root, "PASCAL_MT")
            self.names = _read_names(self.root / "ImageSets" / "Context" / f"{split}.txt")
            known: dict[str, int] = dict(PASCAL_CONTEXT_TASKS)
        elif dataset == "nyud":
            self.root = _resolve_root(root, "NYUD_MT")
            self.names = _read_names(self.root / "gt_sets" / f"{split}.txt")
            known = dict(NYUD_TASKS)
        else:
            self.root = root
            self.names = _read_names(root / f"{split}.txt")
            present = [t for t in FOLDER_TASKS if (root / t).is_dir()]
            known = {t: FIXED_OUTPUTS.get(t, 0) for t in present}
        tasks = tuple(tasks) or tuple(known)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise SakError(f"{dataset} at {self.root} has no task {unknown}; it has: {', '.join(known)}")
        self.tasks = tasks
        self.outputs = {t: known[t] for t in tasks}
        if dataset == "folder":
            for t in CLASS_TASKS:
                if t in tasks:
                    self.outputs[t] = self._folder_classes(t)

    def __len__(self) -> int:
        return len(self.names)

    def _folder_classes(self, task: str) -> int:
        spec = self.root / "classes.json"
        if spec.exists():
            classes = json.loads(spec.read_text())
            if task in classes:
                return int(classes[task])
        top = 0  # max id + 1 over the training labels, 255 excluded
        for name in _read_names(self.root / "train.txt"):
            ids = self._label(task, name, None).numpy()
            ids = ids[ids != IGNORE_INDEX]
            top = max(top, int(ids.max()) + 1 if ids.size else 0)
        if top == 0:
            raise SakError(f"{self.root}/{task}: no labelled pixel in the training split")
        return top

    def image_path(self, name: str) -> Path:
        """The source image file of `name` (any of IMAGE_EXTS) in this layout."""
        folder = {"pascal": "JPEGImages", "nyud": "images", "folder": "images"}[self.dataset]
        p = _find(self.root / folder, name, IMAGE_EXTS)
        if p is None:
            raise SakError(f"image {name} not found in {self.root / folder} ({', '.join(IMAGE_EXTS)})")
        return p

    def _label(self, task: str, name: str, shape: tuple[int, int] | None) -> torch.Tensor:
        r, missing = self.root, None
        if self.dataset == "pascal":
            folder = {
                "semseg": r / "semseg" / "pascal-context",
                "human_parts": r / "human_parts",
                "sal": r / "sal_distill",
                "normals": r / "normals_distill",
                "edge": r / "edge",
            }[task]
        elif self.dataset == "nyud":
            folder = {"semseg": r / "segmentation"}.get(task, r / task)
        else:
            folder = r / task
        if self.dataset == "pascal" and task == "edge" and not (folder / f"{name}.png").exists():
            mat = r / "pascal-context" / "trainval" / f"{name}.mat"
            if mat.exists():
                from scipy.io import loadmat

                return torch.from_numpy(edges_from_label_map(loadmat(str(mat))["LabelMap"]))
            missing = f"{folder}/{name}.png or {mat}"
        if self.dataset == "pascal" and task == "human_parts" and not (folder / f"{name}.png").exists():
            if shape is None:
                raise SakError("human-parts .mat needs the image size")
            mat = folder / f"{name}.mat"
            parts = human_parts_from_mat(mat, shape) if mat.exists() else np.full(shape, IGNORE_INDEX)
            return torch.from_numpy(parts.astype(np.int64))
        path = _find(folder, name, (".png", ".npy"))
        if path is None:
            raise SakError(f"no {task} label for {name}: expected {missing or f'{folder}/{name}.png|.npy'}")
        x = np.load(path, allow_pickle=False) if path.suffix == ".npy" else _read_png(path)
        if task in CLASS_TASKS:
            ids = _class_ids(x)
            if self.dataset == "nyud" and task == "semseg":  # stored 0 = void, 1..40 -> 0..39, void -> 255
                ids = torch.where(ids == 0, IGNORE_INDEX, ids - 1)
            return ids
        if task in ("sal", "edge"):
            return _binary(x)
        if task == "normals":
            return _normals_npy(x) if path.suffix == ".npy" else _normals_png(x)
        return _depth(x, from_png=path.suffix == ".png")

    def load(self, index: int) -> dict:
        """The unaugmented sample: image (3, H, W) uint8 and labels in the module's in-memory form."""
        name = self.names[index]
        image = read_image(self.image_path(name))
        h, w = image.shape[-2:]
        labels = {}
        for t in self.tasks:
            x = self._label(t, name, (h, w))
            if tuple(x.shape[-2:]) != (h, w):
                raise SakError(f"{t} label of {name} is {tuple(x.shape[-2:])}, its image {(h, w)}")
            labels[t] = x
        return {"name": name, "image": image, "labels": labels, "size": (h, w)}

    def __getitem__(self, index: int) -> dict:
        return self.load(index)


class TrainSamples(torch.utils.data.Dataset):
    """Position p of an endless training stream -> augmented sample (epoch p // N, seeded order).

    Epoch e visits the images in a permutation drawn from (seed, e); sample plans use (seed, name, e).
    """

    def __init__(
        self,
        data: DenseDataset,
        crop: tuple[int, int],
        seed: int = 0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        photometric: bool = True,
    ) -> None:
        self.data, self.crop, self.seed = data, tuple(crop), seed
        self.scale_range, self.photometric = tuple(scale_range), photometric

    def __len__(self) -> int:
        return 2**62  # endless; index by stream position

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x5A4B])
        return rng.permutation(len(self.data))

    def plan(self, name: str, epoch: int, height: int, width: int) -> AugmentPlan:
        return augment_plan(
            self.seed, name, epoch, height, width, self.crop, self.scale_range, self.photometric
        )

    def __getitem__(self, position: int) -> dict:
        epoch, k = divmod(int(position), len(self.data))
        index = int(self.order(epoch)[k])
        sample = self.data.load(index)
        h, w = sample["size"]
        out = apply_plan(sample, self.plan(sample["name"], epoch, h, w), self.crop)
        out["row"] = epoch * len(self.data) + index  # the (epoch, image) row of a stage-2 cache
        return out


class EvalSamples(torch.utils.data.Dataset):
    """Evaluation: every image once, padded right/bottom to the input size."""

    def __init__(self, data: DenseDataset, size: tuple[int, int]) -> None:
        self.data, self.size = data, tuple(size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return pad_for_eval(self.data.load(index), self.size)


def collate(samples: list[dict]) -> dict:
    """-> {"names": [B], "images": (B, 3, H, W) uint8, "labels": {task: (B, ...)}, "sizes": [(h, w)]},
    plus "rows": [B] (epoch * N + image index) for training samples."""
    batch = {
        "names": [s["name"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "labels": {t: torch.stack([s["labels"][t] for s in samples]) for t in samples[0]["labels"]},
        "sizes": [tuple(s["size"]) for s in samples],
    }
    if "row" in samples[0]:
        batch["rows"] = [int(s["row"]) for s in samples]
    return batch
