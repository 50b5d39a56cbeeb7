"""What a stage-2 target cache is made of, composed for the pipeline's builder: the stage-2 dataset's
augmented views (student/data/stage2_views.py) and the teachers of a stage-1 run or given by name
(stage2_teachers.py), as one typed `Stage2Source` (pipeline/extraction/stage2.py).

`sak-cache stage2` takes the options of `Stage2SourceConfig` (here: dataset, views, teachers) and of the
pipeline's `Stage2BuildConfig` (out, epochs, codec, shards, where the teachers run).

The trainer refuses (one line naming both values) a cache whose dataset, split, images, seed, crop,
augmentation, plan version or teachers differ from the run's, or that holds fewer epochs than the run
needs, and checks every batch image against the recorded sha256 (student/data/stage2_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.weights import weights_field
from sak.student.data.dense_sets import DATASETS, DEFAULT_INPUT_SIZE, parse_img_size


@dataclass(frozen=True)
class Stage2SourceConfig:
    """dataset, data_root: as for `sak-train stage2`; init: the stage-1 run (its teachers), or teachers by
    name. img_size: the crop (H, W), None = the dataset's default. scale_range, photometric, seed: the
    stage-2 run's."""

    dataset: str = field(
        metadata={"help": "Dense dataset: PASCAL-Context, NYUD-v2, or your own folder.", "choices": DATASETS}
    )
    data_root: str = field(metadata={"help": "PASCAL_MT / NYUD_MT (or their parent), or your folder."})
    init: str | None = field(
        default=None,
        metadata={
            "help": "The stage-1 run (its teachers' stores); or name them with --teachers.",
            "metavar": "RUN",
        },
    )
    teachers: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Teachers by name (dinov2_l,clip_l,sam_l) instead of a stage-1 --init run."},
    )
    weights: tuple[tuple[str, str], ...] = weights_field(
        "Local .safetensors/.pth weights of a named teacher (repeatable); default: timm hub weights."
    )
    random_init: bool = field(
        default=False, metadata={"help": "Named teachers with random weights (tests; flagged in cache.json)."}
    )
    img_size: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "HxW crop, as `sak-train stage2` [default: 512x512, NYUD 448x576].",
            "parse": parse_img_size,
        },
    )
    scale_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"cli": False})
    photometric: bool = field(default=True, metadata={"cli": False})
    seed: int = field(
        default=0, metadata={"help": "The stage-2 run's --seed (and the named teachers' random init)."}
    )

    def crop(self) -> tuple[int, int]:
        return tuple(self.img_size) if self.img_size else DEFAULT_INPUT_SIZE[self.dataset]


def stage2_source(cfg: Stage2SourceConfig):
    """The views and teachers of a stage-2 cache, checked and described for the builder (no model loaded:
    the builder's workers load the teachers)."""
    from sak.pipeline.extraction.stage2 import Stage2Source
    from sak.student.data.stage2_views import Stage2Views
    from sak.student.train.stage2_teachers import Stage2TeacherSet

    crop = cfg.crop()
    if crop[0] % 16 or crop[1] % 16 or min(crop) < 32:
        raise SakError(f"--img-size {crop[0]}x{crop[1]}: both sides must be multiples of 16 and >= 32")
    root = str(Path(cfg.data_root).expanduser().resolve())
    views = Stage2Views(cfg.dataset, root, crop, cfg.seed, cfg.scale_range, cfg.photometric)
    teachers = Stage2TeacherSet(
        init=str(Path(cfg.init).expanduser().resolve()) if cfg.init else None,
        names=tuple(cfg.teachers),
        weights=tuple(cfg.weights),
        random_init=cfg.random_init,
        seed=cfg.seed,
        crop=crop,
    )
    infos = tuple(teachers.infos())
    return Stage2Source(
        identity=views.identity([t.fingerprint for t in infos]),
        crop=crop,
        data_root=root,
        init=teachers.init,
        teachers=infos,
        loader=teachers,
        views=views,
    )
