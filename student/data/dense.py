"""Dense multi-task datasets for stage 2 (PASCAL-Context, NYUD-v2, a plain folder) and their samples.

Every layout loads into one in-memory form (what the losses in task_losses.py and the meters in
metrics.py take):

    image                   (3, H, W) uint8 RGB
    semseg, human_parts     (H, W) int64 class ids, 255 = ignore
    sal, edge               (H, W) uint8 in {0, 1}, 255 = ignore
    normals                 (3, H, W) float32 (x right, y, z), all-zero = invalid
    depth                   (1, H, W) float32 metres, 0 = invalid

Files read, in the releases' formats (PASCAL_MT and NYUD_MT of MTI-Net / ATRC / InvPT / SAK), by the
rules of the reference loaders (innovator-zero/SAK datasets/; docs/protocol.md names each reference):

    PASCAL_MT/   (--data-root may name PASCAL_MT itself or its parent)
      ImageSets/Context/{train,val}.txt     one image id per line
      JPEGImages/<id>.jpg                   the image
      semseg/VOC12/<id>.png                 class ids 0..20 as stored (255 kept as ignore), read first when
      semseg/pascal-context/<id>.png        it exists, else the pascal-context one
      human_parts/<id>.mat                  Pascal-Part annotation (scipy.io.loadmat): the parts of every
                                            person, merged into 6 (head 1, torso 2, upper arms 3, lower
                                            arms + hands 4, upper legs 5, lower legs + feet 6), the rest 0;
                                            all 0 when no person (or human_parts/<id>.png: ids as stored).
                                            A training crop / evaluation image without any part pixel is
                                            all-ignore (dense_augment.ignore_partless)
      sal_distill/<id>.png                  saliency: value / 255 > 0.5 -> 1, else 0 (no ignore)
      normals_distill/<id>.png              normals: 2 * value / 255 - 1 per channel (or <id>.npy HxWx3),
                                            kept only where the LabelMap class is NYU-compatible (json/
                                            nyu_classes.json and context_classes.json when present, else
                                            dense_labels.NORMALS_VALID_CLASSES), zero (invalid) elsewhere
      pascal-context/trainval/<id>.mat      LabelMap: the normals mask; boundaries = |3x3 Laplacian| > 0,
                                            thinned (the training target); its seg2bmap is the SEISM
                                            evaluation ground truth (boundary_eval.py)
    NYUD_MT/     (--data-root may name NYUD_MT itself or its parent)
      gt_sets/{train,val}.txt               one image id per line
      images/<id>.png|jpg                   the image
      segmentation/<id>.png                 stored 0 = void, 1..40 classes -> value - 1, void -> 255
      depth/<id>.npy                        float metres (0 = missing); or <id>.png in millimetres (uint16)
      normals/<id>.png                      2 * value / 255 - 1 (or <id>.npy float HxWx3 in [-1, 1])
      edge/<id>.png                         value / 255 > 0.5 -> 1 (or <id>.npy with 0/1)
      edge_mat/<id>.mat (optional)          BSDS groundTruth{1}.Boundaries: the SEISM evaluation ground
                                            truth when present (else edge/<id>.png stands in for it)
    a folder (your own data, --dataset folder):
      DIR/train.txt, DIR/val.txt            names, one per line
      DIR/images/<name>.jpg|png
      DIR/<task>/<name>.png|npy             semseg, human_parts: uint8 ids, 255 = ignore;
                                            sal, edge: PNG 0/255 (value / 255 > 0.5) or .npy 0/1 (> 0.5);
                                            normals: float32 .npy HxWx3; depth: float32 .npy metres, 0 = invalid
      DIR/classes.json (optional)           {"semseg": K, "human_parts": K}; otherwise max id + 1 over
                                            the training labels

Nothing is ever written into a dataset folder (SAK's loader writes a parts index into PASCAL_MT; here the
person test is made per image from its .mat). Augmentation and evaluation padding: dense_augment.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.student.data.dense_augment import (
    EVAL_PAD_COLOUR,
    AugmentPlan,
    apply_plan,
    augment_plan,
    pad_for_eval,
    pad_value,
)
from sak.student.data.dense_labels import (
    IMAGE_EXTS,
    binary_mask,
    class_ids,
    depth_map,
    edges_from_label_map,
    find_file,
    human_parts_from_mat,
    mask_normals,
    normals_npy,
    normals_png,
    nyud_semseg,
    pascal_normals_classes,
    read_image,
    read_label_map,
    read_nyud_boundaries,
    read_png,
)
from sak.student.data.dense_sets import (  # noqa: F401  (re-exported: the stage-2 source's imports)
    DATASET_METRIC_NAME,
    DATASETS,
    DEFAULT_INPUT_SIZE,
    parse_img_size,
)
from sak.student.model.multitask import NYUD_TASKS, PASCAL_CONTEXT_TASKS

IGNORE_INDEX = 255
# The references' evaluation input (SAK datasets/utils/configs.py INPUT_SIZE): images centre-padded to it.
# A folder dataset has none: its images are padded to the run's input size.
EVAL_SIZE = {"pascal": (512, 512), "nyud": (448, 576)}
FOLDER_TASKS = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
FIXED_OUTPUTS = {"sal": 1, "normals": 3, "edge": 1, "depth": 1}
CLASS_TASKS = ("semseg", "human_parts")


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
        self._normals_classes = pascal_normals_classes(self.root) if dataset == "pascal" else ()

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
        p = find_file(self.root / folder, name, IMAGE_EXTS)
        if p is None:
            raise SakError(f"image {name} not found in {self.root / folder} ({', '.join(IMAGE_EXTS)})")
        return p

    def _label_map_path(self, name: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{name}.mat"

    def _label(self, task: str, name: str, shape: tuple[int, int] | None) -> torch.Tensor:
        if self.dataset == "pascal":
            return self._pascal_label(task, name, shape)
        folder = self.root / ("segmentation" if (self.dataset, task) == ("nyud", "semseg") else task)
        path = find_file(folder, name, (".png", ".npy"))
        if path is None:
            raise SakError(f"no {task} label for {name}: expected {folder}/{name}.png|.npy")
        return self._decode(task, path)

    def _decode(self, task: str, path: Path) -> torch.Tensor:
        png = path.suffix == ".png"
        x = read_png(path) if png else np.load(path, allow_pickle=False)
        if task in CLASS_TASKS:
            return nyud_semseg(x) if (self.dataset, task) == ("nyud", "semseg") else class_ids(x)
        if task in ("sal", "edge"):
            return binary_mask(x, from_png=png)
        if task == "normals":
            return normals_png(x) if png else normals_npy(x)
        return depth_map(x, from_png=png)

    def _pascal_label(self, task: str, name: str, shape: tuple[int, int] | None) -> torch.Tensor:
        r = self.root
        if task == "semseg":  # SAK _get_semseg_fname: the VOC12 annotation wins when it exists
            path = find_file(r / "semseg" / "VOC12", name, (".png",)) or find_file(
                r / "semseg" / "pascal-context", name, (".png",)
            )
            if path is None:
                raise SakError(f"no semseg label for {name} in {r}/semseg/VOC12 or {r}/semseg/pascal-context")
            return class_ids(read_png(path))
        if task == "edge":
            return torch.from_numpy(edges_from_label_map(read_label_map(self._label_map_path(name))))
        if task == "human_parts":
            png = r / "human_parts" / f"{name}.png"
            if png.exists():
                return class_ids(read_png(png))
            if shape is None:
                raise SakError("human-parts .mat needs the image size")
            mat = r / "human_parts" / f"{name}.mat"
            parts = human_parts_from_mat(mat, shape) if mat.exists() else np.zeros(shape, np.uint8)
            return torch.from_numpy(parts.astype(np.int64))
        folder = r / {"sal": "sal_distill", "normals": "normals_distill"}[task]
        path = find_file(folder, name, (".png", ".npy"))
        if path is None:
            raise SakError(f"no {task} label for {name}: expected {folder}/{name}.png|.npy")
        x = self._decode(task, path)
        if task == "normals":
            x = mask_normals(x, read_label_map(self._label_map_path(name)), self._normals_classes)
        return x

    def boundary_source(self, name: str) -> np.ndarray:
        """The map SEISM draws the evaluation boundaries from (seg2bmap, then thinning: boundary_eval.py):
        PASCAL the LabelMap; NYUD edge_mat/<id>.mat's Boundaries, or edge/<id>.png standing in for it; a
        folder its edge mask (ignore -> 0)."""
        if self.dataset == "pascal":
            return read_label_map(self._label_map_path(name))
        mat = self.root / "edge_mat" / f"{name}.mat"
        if self.dataset == "nyud" and mat.exists():
            return read_nyud_boundaries(mat)
        edge = self._label("edge", name, None).numpy()
        return (edge == 1).astype(np.uint8)

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
    """Evaluation: every image once, whole, centre-padded to `size` (dense_augment.pad_for_eval); with
    boundaries=True each sample also carries its SEISM "boundary_source" (DenseDataset.boundary_source)."""

    def __init__(self, data: DenseDataset, size: tuple[int, int], boundaries: bool = False) -> None:
        self.data, self.size, self.boundaries = data, tuple(size), boundaries

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        out = pad_for_eval(self.data.load(index), self.size)
        if self.boundaries:
            out["boundary_source"] = self.data.boundary_source(out["name"])
        return out


def _stack_padded(samples: list[dict]) -> list[dict]:
    """Evaluation samples of different padded sizes (images larger than the evaluation size) -> all at the
    batch's largest, grown at the bottom/right with the same fills (their EvalPad stays valid)."""
    size = tuple(max(s["image"].shape[-2 + k] for s in samples) for k in range(2))
    out = []
    for s in samples:
        ph, pw = size[0] - s["image"].shape[-2], size[1] - s["image"].shape[-1]
        if not (ph or pw):
            out.append(s)
            continue
        image = torch.empty((3, *size), dtype=torch.uint8)
        image[:] = torch.tensor(EVAL_PAD_COLOUR, dtype=torch.uint8).view(3, 1, 1)
        image[:, : s["image"].shape[-2], : s["image"].shape[-1]] = s["image"]
        labels = {}
        for t, x in s["labels"].items():
            flat = x.dim() == 2
            y = torch.nn.functional.pad(x[None] if flat else x, (0, pw, 0, ph), value=pad_value(t))
            labels[t] = y[0] if flat else y
        out.append({**s, "image": image, "labels": labels})
    return out


def collate(samples: list[dict]) -> dict:
    """-> {"names": [B], "images": (B, 3, H, W) uint8, "labels": {task: (B, ...)}, "sizes": [(h, w)]},
    plus "rows": [B] (epoch * N + image index) for training samples, "pads": [EvalPad] for evaluation
    samples and "boundary_sources": [(h, w) arrays] when they carry them."""
    if "pad" in samples[0]:
        samples = _stack_padded(samples)
    batch = {
        "names": [s["name"] for s in samples],
        "images": torch.stack([s["image"] for s in samples]),
        "labels": {t: torch.stack([s["labels"][t] for s in samples]) for t in samples[0]["labels"]},
        "sizes": [tuple(s["size"]) for s in samples],
    }
    if "row" in samples[0]:
        batch["rows"] = [int(s["row"]) for s in samples]
    if "pad" in samples[0]:
        batch["pads"] = [s["pad"] for s in samples]
    if "boundary_source" in samples[0]:
        batch["boundary_sources"] = [s["boundary_source"] for s in samples]
    return batch
