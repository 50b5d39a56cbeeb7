"""The dense datasets by name, their default input sizes, and the one `--img-size` syntax.

No torch here: the trainers' options (`sak-train ... --help`) read these without loading a model library.
"""

from __future__ import annotations

from sak.pipeline.base.errors import SakError

DATASETS = ("pascal", "nyud", "folder")
DATASET_METRIC_NAME = {"pascal": "pascal_context", "nyud": "nyud", "folder": "folder"}
DEFAULT_INPUT_SIZE = {"pascal": (512, 512), "nyud": (448, 576), "folder": (512, 512)}


def parse_img_size(text: str | None, option: str = "--img-size") -> tuple[int, int] | None:
    """`HxW` or a single side `S` (= SxS), as every trainer takes it -> (H, W); None when not given."""
    if text is None or not str(text).strip():
        return None
    h, sep, w = str(text).lower().partition("x")
    w = w if sep else h
    if not h.strip().isdigit() or not w.strip().isdigit() or int(h) < 1 or int(w) < 1:
        raise SakError(f"{option} {text!r} must look like HxW or one side, e.g. 512x512, 448x576 or 384")
    return int(h), int(w)


def parse_grid(text: str | None) -> tuple[int, int] | None:
    """`--grid HxW` (or one side): a token grid, in the same syntax as --img-size."""
    return parse_img_size(text, "--grid")
