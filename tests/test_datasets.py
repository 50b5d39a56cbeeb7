"""Stage-2 datasets: the three layouts load to the same in-memory form, augmentation pads with the
ignore values, flips the normals' x component, and replays exactly from its plan. (The reference rules on
the releases' exact file formats: test_protocol_data.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from sak.pipeline.base.errors import SakError
from sak.student.data.dense import DenseDataset, EvalSamples, TrainSamples, collate
from sak.student.data.dense_augment import AugmentPlan, apply_plan, augment_plan
from sak.student.data.dense_labels import edges_from_label_map

H, W = 40, 56
NAMES = ["a1", "b2", "c3"]


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _regions(seed: int) -> np.ndarray:
    """(H, W) region ids 0..3: the left half vs right half, top vs bottom."""
    y, x = np.mgrid[0:H, 0:W]
    return ((x >= W // 2).astype(np.uint8) + 2 * (y >= H // 2)).astype(np.uint8) + seed % 2


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _normals_png(seed: int) -> np.ndarray:
    n = np.zeros((H, W, 3), np.float32)
    n[..., 0], n[..., 2] = 0.6, 0.8  # pointing right and towards the camera
    return np.round((n + 1) / 2 * 255).astype(np.uint8)


def make_pascal(root: Path) -> Path:
    r = root / "PASCAL_MT"
    (r / "ImageSets" / "Context").mkdir(parents=True)
    (r / "ImageSets/Context/train.txt").write_text("\n".join(NAMES[:2]) + "\n")
    (r / "ImageSets/Context/val.txt").write_text(NAMES[2] + "\n")
    for i, n in enumerate(NAMES):
        _png(r / "JPEGImages" / f"{n}.png", _image(i))  # png stands in for jpg (lossless in the test)
        (r / "JPEGImages" / f"{n}.png").rename(r / "JPEGImages" / f"{n}.jpg")
        _png(r / "semseg/pascal-context" / f"{n}.png", _regions(i))
        sal = np.zeros((H, W), np.uint8)
        sal[:, : W // 2] = 200
        _png(r / "sal_distill" / f"{n}.png", sal)
        _png(r / "normals_distill" / f"{n}.png", _normals_png(i))
        (r / "pascal-context/trainval").mkdir(parents=True, exist_ok=True)
        savemat(r / "pascal-context/trainval" / f"{n}.mat", {"LabelMap": _regions(i).astype(np.uint16)})
    (r / "human_parts").mkdir()
    parts = np.zeros((H, W), np.uint8)
    parts[:10, :10] = 1
    _png(r / "human_parts/a1.png", parts)
    # b2: Pascal-Part .mat with one person (head + left hand) and one non-person object
    head, hand = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    head[:5, :5], hand[20:25, 30:35] = 1, 1
    part_dtype = [("part_name", "O"), ("mask", "O")]
    person_parts = np.array([[("head", head), ("lhand", hand)]], dtype=part_dtype)
    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objects = np.array(
        [[("person", 15, head | hand, person_parts), ("dog", 12, head, np.zeros((0, 0)))]], dtype=obj_dtype
    )
    anno = np.array([[("b2", objects)]], dtype=[("imname", "O"), ("objects", "O")])
    savemat(r / "human_parts/b2.mat", {"anno": anno})
    return root


def make_nyud(root: Path) -> Path:
    r = root / "NYUD_MT"
    (r / "gt_sets").mkdir(parents=True)
    (r / "gt_sets/train.txt").write_text("\n".join(NAMES[:2]))
    (r / "gt_sets/val.txt").write_text(NAMES[2])
    for i, n in enumerate(NAMES):
        _png(r / "images" / f"{n}.png", _image(i))
        seg = _regions(i) + 1
        seg[0, :] = 0  # void
        _png(r / "segmentation" / f"{n}.png", seg)
        depth = np.full((H, W), 2.5, np.float32)
        depth[:, :3] = 0
        (r / "depth").mkdir(exist_ok=True)
        np.save(r / "depth" / f"{n}.npy", depth)
        _png(r / "normals" / f"{n}.png", _normals_png(i))
        edge = np.zeros((H, W), np.uint8)
        edge[H // 2, :] = 255
        _png(r / "edge" / f"{n}.png", edge)
    return root


def make_folder(root: Path, names=NAMES, seed: int = 0) -> Path:
    """The generic layout with semseg (0..3) and normals (.npy), learnable from the image colours."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n".join(names[:-1]))
    (root / "val.txt").write_text(names[-1])
    for i, n in enumerate(names):
        regions = _regions(i + seed)
        colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [20, 200, 200]])
        img = colours[regions].astype(np.int64) + np.random.default_rng(i).integers(-20, 20, (H, W, 3))
        _png(root / "images" / f"{n}.png", img.clip(0, 255).astype(np.uint8))
        _png(root / "semseg" / f"{n}.png", regions)
        normals = np.zeros((H, W, 3), np.float32)
        normals[..., 2] = 1.0
        normals[regions % 2 == 1] = (0.6, 0.0, 0.8)
        (root / "normals").mkdir(exist_ok=True)
        np.save(root / "normals" / f"{n}.npy", normals)
    return root


def test_pascal_layout_loads_every_task(tmp_path):
    data = DenseDataset("pascal", make_pascal(tmp_path), "train")
    assert data.tasks == ("semseg", "human_parts", "sal", "normals", "edge") and len(data) == 2
    s = data.load(0)
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.uint8
    assert torch.equal(s["labels"]["semseg"], torch.from_numpy(_regions(0).astype(np.int64)))
    assert set(s["labels"]["sal"].unique().tolist()) == {0, 1} and s["labels"]["sal"][0, 0] == 1
    # normals only where the LabelMap class is NYU-compatible: class 3 (bottom right) is, class 0 is not
    assert torch.allclose(s["labels"]["normals"][:, -1, -1], torch.tensor([0.6, 0.0, 0.8]), atol=0.01)
    assert (s["labels"]["normals"][:, 0, 0] == 0).all()
    edge = s["labels"]["edge"]
    assert torch.equal(edge, torch.from_numpy(edges_from_label_map(_regions(0))))
    assert edge[:, W // 2 - 1 : W // 2 + 1].any() and not edge[:10, :10].any()
    parts = data.load(1)["labels"]["human_parts"]  # from the .mat: head 1, left hand -> lower arm 4
    assert parts[0, 0] == 1 and parts[22, 32] == 4 and parts[H - 1, 0] == 0


def test_pascal_image_without_human_parts_is_ignored_in_evaluation(tmp_path):
    data = DenseDataset("pascal", make_pascal(tmp_path) / "PASCAL_MT", "val", ("human_parts",))
    assert (data.load(0)["labels"]["human_parts"] == 0).all()  # no .mat: nobody, all background
    assert (EvalSamples(data, (48, 64))[0]["labels"]["human_parts"] == 255).all()  # ... and so ignored


def test_nyud_layout_maps_void_and_depth(tmp_path):
    data = DenseDataset("nyud", make_nyud(tmp_path), "train")
    assert data.tasks == ("semseg", "normals", "edge", "depth")
    s = data.load(0)["labels"]
    seg = s["semseg"]
    assert (seg[0] == 255).all() and seg[1, 0] == 0 and seg[-1, -1] == 3  # stored 1..40 -> 0..39
    assert s["depth"].shape == (1, H, W) and s["depth"][0, 5, 5] == 2.5 and s["depth"][0, 5, 0] == 0
    assert s["edge"][H // 2].all() and s["edge"].sum() == W


def test_folder_layout_and_class_count(tmp_path):
    data = DenseDataset("folder", make_folder(tmp_path / "f"), "train")
    assert data.tasks == ("semseg", "normals") and data.outputs == {"semseg": 5, "normals": 3}
    with pytest.raises(SakError, match="has no task"):
        DenseDataset("folder", tmp_path / "f", "train", ("depth",))


def test_augmentation_pads_with_ignore_and_flips_normals(tmp_path):
    data = DenseDataset("nyud", make_nyud(tmp_path), "train")
    sample = data.load(0)
    crop = (64, 80)  # larger than the image: padding must appear
    plan = AugmentPlan(1.0, True, 0, 0, None, None, None, None, True)
    out = apply_plan(sample, plan, crop)
    lab = out["labels"]
    assert out["image"].shape == (3, *crop) and out["size"] == (H, W)
    # flipped: the valid region is now on the right; padding (bottom and left after the flip)
    assert (lab["semseg"][H:] == 255).all() and (lab["semseg"][:, : crop[1] - W] == 255).all()
    assert (lab["edge"][H:] == 255).all()
    assert (lab["depth"][:, H:] == 0).all() and (lab["normals"][:, :, : crop[1] - W] == 0).all()
    n = lab["normals"][:, 5, crop[1] - 5]  # a valid pixel
    assert n[0] < -0.5 and n[2] > 0.5  # x negated, z kept
    flipped_img = sample["image"].flip(-1)
    assert torch.equal(out["image"][:, :H, crop[1] - W :], flipped_img)
    unflipped = apply_plan(sample, AugmentPlan(1.0, False, 0, 0, None, None, None, None, True), crop)
    assert unflipped["labels"]["normals"][0, 5, 5] > 0.5


def test_scaling_and_photometric_keep_labels_consistent(tmp_path):
    data = DenseDataset("folder", make_folder(tmp_path / "f"), "train")
    sample = data.load(0)
    plan = AugmentPlan(2.0, False, 10, 20, 20.0, 1.3, 0.7, 0.05, False)
    out = apply_plan(sample, plan, (32, 48))
    assert out["labels"]["semseg"].shape == (32, 48) and out["labels"]["normals"].shape == (3, 32, 48)
    # nearest-neighbour labels: the label at scaled (y, x) is the source label at (y / 2, x / 2)
    assert out["labels"]["semseg"][0, 0] == sample["labels"]["semseg"][5, 10]
    assert not torch.equal(
        out["image"],
        apply_plan(sample, AugmentPlan(2.0, False, 10, 20, *[None] * 4, False), (32, 48))["image"],
    )


def test_plan_replays_and_differs_by_epoch(tmp_path):
    a = augment_plan(3, "img7", 2, 375, 500, (512, 512))
    assert a == augment_plan(3, "img7", 2, 375, 500, (512, 512))
    assert 0.5 <= a.scale < 2.0
    plans = {augment_plan(3, "img7", e, 375, 500, (512, 512)) for e in range(8)}
    assert len(plans) == 8
    data = DenseDataset("folder", make_folder(tmp_path / "f"), "train")
    samples = TrainSamples(data, (32, 32), seed=5)
    x, y = samples[3], samples[3]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"]["semseg"], y["labels"]["semseg"])
    epoch, k = divmod(3, len(data))
    s = data.load(int(samples.order(epoch)[k]))
    replay = apply_plan(s, samples.plan(s["name"], epoch, H, W), (32, 32))
    assert torch.equal(replay["image"], x["image"])


def test_eval_centre_pads_without_resizing_and_never_refuses(tmp_path):
    data = DenseDataset("folder", make_folder(tmp_path / "f"), "val")
    batch = collate([EvalSamples(data, (48, 64))[0]])
    top, left = (48 - H) // 2, (64 - W) // 2
    assert batch["images"].shape == (1, 3, 48, 64) and batch["sizes"] == [(H, W)]
    assert (batch["pads"][0].top, batch["pads"][0].left) == (top, left)
    semseg = batch["labels"]["semseg"][0]
    assert torch.equal(semseg[top : top + H, left : left + W], data.load(0)["labels"]["semseg"])
    assert (
        (semseg[:top] == 255).all() and (semseg[top + H :] == 255).all() and (semseg[:, :left] == 255).all()
    )
    assert (batch["labels"]["normals"][0, :, :, :left] == 0).all()
    larger = collate([EvalSamples(data, (32, 32))[0]])  # the image is larger: its own size, rounded to 16
    assert larger["images"].shape == (1, 3, 48, 64) and larger["pads"][0].top == (48 - H) // 2
