"""`eval --save-predictions`: the prediction files of the reference code (innovator-zero/SAK
evaluation/save_img.py, folders as utils.create_pred_dir makes them), so SEISM's MATLAB scripts (and any
other tool of the field) read them as they read SAK's.

    OUT/predictions/edge/img/<id>.png     L, uint8(sigmoid * 255) truncated: what seism's nms_process.m reads
    OUT/predictions/edge/nms/<id>.png     L, this project's NMS of it (nms_process.m writes the same folder:
                                          running it replaces these with MATLAB's)
    OUT/predictions/sal/<id>.png          L, uint8(p * 255) truncated
    OUT/predictions/semseg/<id>.png       RGB, the PASCAL VOC colour map (NYUD: class + 1, as save_img)
    OUT/predictions/human_parts/<id>.png  RGB, the VOC colour map
    OUT/predictions/normals/<id>.png      RGB, uint8((unit normal + 1) * 255 / 2) truncated
    OUT/predictions/depth/<id>.npy        float32 (H, W) metres, clamped at 0

Every map is of the whole image, cropped back from the padded input. Then, in a seism checkout:
nms_process('OUT/predictions/edge') (optional) and pr_curves_base.m with the method dir edge/nms, as SAK's
evaluation/edge_evaluation.py generates it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sak.student.train.boundary_eval import nms_png, quantise

VOID_COLOUR = (224, 223, 192)  # save_img's colour for ids outside the map


def label_colormap(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class id), (n, 3) uint8: 0 black, 1 (128, 0, 0), ..."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def _colour(ids: np.ndarray, n: int) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours of the first n map entries, void elsewhere."""
    out = np.empty((*ids.shape, 3), np.uint8)
    out[:] = VOID_COLOUR
    inside = (ids >= 0) & (ids < n)
    out[inside] = label_colormap(n)[ids[inside]]
    return out


def save_prediction(root: Path, dataset: str, name: str, task: str, pred: torch.Tensor, classes: int) -> None:
    """Write one image's prediction of `task` (the meter's form, cropped to the image) under root."""
    x = pred.detach().cpu()
    folder = root / task
    if task == "edge":
        saved = quantise(x.reshape(x.shape[-2:]).numpy())
        for sub, array in (("img", saved), ("nms", nms_png(saved))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / sub / f"{name}.png")
        return
    folder.mkdir(parents=True, exist_ok=True)
    if task == "sal":
        Image.fromarray(quantise(x.reshape(x.shape[-2:]).numpy())).save(folder / f"{name}.png")
    elif task in ("semseg", "human_parts"):
        ids = x.numpy().astype(np.int64)
        if dataset == "nyud" and task == "semseg":  # save_img: NYUDSegmentationMaskDecoder(41), ids + 1
            ids, classes = ids + 1, 41
        elif dataset == "pascal":
            classes = 21 if task == "semseg" else 7
        Image.fromarray(_colour(ids, classes)).save(folder / f"{name}.png")
    elif task == "normals":
        unit = torch.nn.functional.normalize(x.float(), p=2, dim=0)  # (3, H, W)
        rgb = ((unit + 1.0) * 255 / 2.0).permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{name}.png")
    elif task == "depth":
        np.save(folder / f"{name}.npy", x.reshape(x.shape[-2:]).clamp_min(0).numpy().astype(np.float32))
