"""`make demo`: the whole product offline in a minute, on the colour photos shipped inside scikit-image.

1. writes the photos to DEMO/photos (PNG, as a user's image folder would hold them);
2. `sak-cache run` with tiny random-init DINOv2, CLIP and SAM, K=2 views, on an embedded local Ray;
3. `sak-cache inspect` and `sak-cache verify`; `sak-cache show` writes DEMO/features.png (path printed);
4. when the trainer is installed, a short stage-1 training from the cache, with Rep Sim before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def write_photos(folder: Path) -> list[Path]:
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(np.asarray(getattr(skimage.data, name)())[..., :3]).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_cache", help="demo folder (photos/, cache/, run/)")
    parser.add_argument("--size", type=int, default=224, help="view side in pixels")
    parser.add_argument("--steps", type=int, default=60, help="stage-1 training steps")
    args = parser.parse_args(argv)

    from sak.cli import cache as cache_cli

    root = Path(args.out)
    photos = root / "photos"
    write_photos(photos)
    cache = str(root / "cache")
    print(
        f"== extracting tiny teacher features of {len(PHOTOS)} scikit-image photos into {cache}", flush=True
    )
    rc = cache_cli.main(
        [
            "run",
            "--source",
            str(photos),
            "--out",
            cache,
            "--teachers",
            "dinov2_tiny,clip_tiny,sam_tiny",
            "--views-per-image",
            "2",
            "--size",
            str(args.size),
            "--shard-size",
            "8",
            "--batch-size",
            "8",
        ]
    )
    if rc:
        return rc
    print("== verify", flush=True)
    rc = cache_cli.main(["verify", cache])
    if rc:
        return rc
    picture = root / "features.png"
    print("== features as pictures (sak-cache show: one PCA-to-RGB panel per teacher and level)", flush=True)
    rc = cache_cli.main(["show", cache, "--view", "0", "--view", "2", "--out", str(picture)])
    if rc:
        return rc
    print(f"features picture: {picture.resolve()}", flush=True)
    if importlib.util.find_spec("sak.student.train.stage1") is None:
        print("(the stage-1 trainer is not part of this build yet; skipping training)")
        return 0
    from sak.cli import train as train_cli

    run = root / "run"
    if run.exists():  # the demo's own run folder: start it afresh so `make demo` can be repeated
        import shutil

        shutil.rmtree(run)
    print(f"== stage-1 training of the tiny student from the cache ({args.steps} steps)", flush=True)
    return train_cli.main(
        [
            "stage1",
            "--cache",
            cache,
            "--student",
            "tiny",
            "--steps",
            str(args.steps),
            "--batch-size",
            "8",
            "--out",
            str(root / "run"),
            "--report-repsim",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
