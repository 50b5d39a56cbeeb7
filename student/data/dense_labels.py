"""Label files of the dense multi-task releases -> the in-memory label tensors (dense.py lists them).

Each rule follows the reference loaders the paper's numbers come from (innovator-zero/SAK
datasets/pascal_context.py and datasets/nyud.py; the same rules as SimonVandenhende/
Multi-Task-Learning-PyTorch data/ and prismformore/Multi-Task-Transformer InvPT/data/); docs/protocol.md
tabulates them. Files are read with PIL, numpy (allow_pickle=False) and scipy.io.loadmat: nothing is
unpickled, and nothing is ever written next to the data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sak.pipeline.base.errors import SakError

IGNORE_INDEX = 255
PERSON_CLASS = 15  # VOC class index of "person" in the Pascal-Part annotation
HUMAN_PART_IDS = {  # Pascal-Part names -> the 6 parts of the multi-task literature (0 = background)
    **dict.fromkeys(["head", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth", "hair"], 1),
    **dict.fromkeys(["torso", "neck"], 2),
    **dict.fromkeys(["luarm", "ruarm"], 3),
    **dict.fromkeys(["llarm", "rlarm", "lhand", "rhand"], 4),
    **dict.fromkeys(["luleg", "ruleg"], 5),
    **dict.fromkeys(["llleg", "rlleg", "lfoot", "rfoot"], 6),
}
# PASCAL normals are kept only on pixels whose PASCAL-Context LabelMap class is also an NYU class (the
# classes of json/nyu_classes.json, "unknown" excluded, found by name in json/context_classes.json) or
# tvmonitor. These are those ids, derived from the class lists of MTI-Net's data/db_info (identical in
# InvPT's); a PASCAL_MT/json/ folder, when present, is read instead.
NORMALS_VALID_CLASSES = (
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53,
    55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111,
    113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184,
    191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242,
    243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288,
    290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349,
    350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411,
    412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
)  # fmt: skip
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------
# files


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def find_file(folder: Path, name: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        p = folder / f"{name}{ext}"
        if p.exists():
            return p
    return None


def read_label_map(path: Path) -> np.ndarray:
    """PASCAL-Context pascal-context/trainval/<id>.mat -> its LabelMap (H, W) int64 (459 classes + 0)."""
    from scipy.io import loadmat

    if not path.exists():
        raise SakError(f"PASCAL-Context label map {path} is missing: normals and boundaries need it")
    return np.asarray(loadmat(str(path))["LabelMap"]).astype(np.int64)


def read_nyud_boundaries(path: Path) -> np.ndarray:
    """NYUD edge_mat/<id>.mat (BSDS format: groundTruth{1}.Boundaries) -> (H, W) uint8 0/1."""
    from scipy.io import loadmat

    cell = loadmat(str(path))["groundTruth"]
    return np.asarray(cell.ravel()[0]["Boundaries"][0, 0]).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# per-task rules


def class_ids(x: np.ndarray) -> torch.Tensor:
    """A label PNG / .npy of class ids as stored -> (H, W) int64 (255 stays the ignore id)."""
    if x.ndim == 3:
        x = x[..., 0]
    return torch.from_numpy(x.astype(np.int64))


def nyud_semseg(x: np.ndarray) -> torch.Tensor:
    """NYUD segmentation/<id>.png: stored 0 = void, 1..40 -> value - 1, void -> 255."""
    ids = class_ids(x)
    return torch.where(ids == 0, IGNORE_INDEX, ids - 1)


def binary_mask(x: np.ndarray, from_png: bool) -> torch.Tensor:
    """Saliency / boundary masks -> (H, W) uint8 {0, 1}: a PNG is value / 255 > 0.5 (the references'
    rule for sal_distill, whatever values it holds); a .npy is value > 0.5."""
    if x.ndim == 3:
        x = x[..., 0]
    x = x.astype(np.float64)
    return torch.from_numpy(((x / 255.0 if from_png else x) > 0.5).astype(np.uint8))


def normals_png(x: np.ndarray) -> torch.Tensor:
    """2 * value / 255 - 1 per channel -> (3, H, W) float32."""
    n = 2.0 * x[..., :3].astype(np.float32) / 255.0 - 1.0  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))


def normals_npy(x: np.ndarray) -> torch.Tensor:
    if x.ndim != 3 or 3 not in (x.shape[-1], x.shape[0]):
        raise SakError(f"normals .npy must be HxWx3, got {x.shape}")
    n = x if x.shape[0] == 3 and x.shape[-1] != 3 else x.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(n.astype(np.float32)))


def mask_normals(normals: torch.Tensor, label_map: np.ndarray, valid_classes: Sequence[int]) -> torch.Tensor:
    """(3, H, W) normals -> zero (invalid) where the LabelMap class is not one of valid_classes."""
    keep = torch.from_numpy(np.isin(label_map, np.asarray(valid_classes, dtype=np.int64)))  # (H, W)
    return torch.where(keep[None], normals, torch.zeros_like(normals))


def pascal_normals_classes(root: Path) -> tuple[int, ...]:
    """The NYU-compatible PASCAL-Context classes (+ tvmonitor): from root/json/ when present."""
    nyu, context = root / "json" / "nyu_classes.json", root / "json" / "context_classes.json"
    if not (nyu.exists() and context.exists()):
        return NORMALS_VALID_CLASSES
    nyu_names, context_ids = json.loads(nyu.read_text()), json.loads(context.read_text())
    valid = [context_ids[n] for n in nyu_names if n in context_ids and n != "unknown"]
    return tuple(int(c) for c in [*valid, context_ids["tvmonitor"]])


def depth_map(x: np.ndarray, from_png: bool) -> torch.Tensor:
    """depth/<id>.npy float metres (0 = missing), or a uint16 PNG in millimetres -> (1, H, W) float32."""
    d = x.astype(np.float32)
    if d.ndim == 3:
        d = d[..., 0]
    if from_png:
        d = d / 1000.0
    return torch.from_numpy(np.nan_to_num(d, nan=0.0))[None]


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """PASCAL boundaries as the references train on them: |3x3 Laplacian of the LabelMap| > 0, thinned."""
    from scipy.ndimage import convolve
    from skimage.morphology import thin

    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
    lap = convolve(label_map.astype(np.float64), kernel, mode="mirror")  # cv2's BORDER_REFLECT_101
    return thin(np.abs(lap) > 0).astype(np.uint8)


def human_parts_from_mat(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Pascal-Part human_parts/<id>.mat -> (H, W) uint8 part ids 0..6, as SAK's _load_human_parts.

    anno.objects[i]: (class, class_ind, mask, parts), parts[j]: (part_name, mask). When some object of
    class 15 (person) has a non-empty mask, every person's parts are painted on zeros; otherwise the map
    is all zeros. (A map left without part pixels becomes all-ignore after the crop: dense_augment.py.)
    """
    from scipy.io import loadmat

    objects = loadmat(str(path))["anno"][0, 0]["objects"].ravel()
    target = np.zeros(shape, np.uint8)
    people = [o for o in objects if int(np.asarray(o["class_ind"]).ravel()[0]) == PERSON_CLASS]
    if not any(np.asarray(o["mask"]).sum() > 0 for o in people):
        return target
    for obj in people:
        for part in np.asarray(obj["parts"]).ravel():
            name = str(np.asarray(part["part_name"]).ravel()[0])
            if name not in HUMAN_PART_IDS:
                raise SakError(f"{path}: unknown human part {name!r}")
            target[np.asarray(part["mask"]).astype(bool)] = HUMAN_PART_IDS[name]
    return target
