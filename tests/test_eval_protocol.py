"""`sak-train eval` by the reference protocol, end to end on a tiny stage-2 run over a PASCAL_MT folder in
the release's format: whole images centre-padded to 512x512 (larger ones to their own size), never
refused, predictions cropped back, odsF by SEISM, and `--save-predictions` writing the files SEISM reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from sak.cli.train import main as train_main
from sak.student.train.boundary_eval import SEISM_MAX_DIST, SeismBoundaryMeter, nms_png, seism_ground_truth
from sak.student.train.stage2 import train_stage2
from sak.student.train.stage2_config import Stage2Config
from tests.test_protocol_data import IDS, H, W, make_pascal_release

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def pascal_run(tiny_stage1_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_protocol")
    (root / "s1").symlink_to(tiny_stage1_run, target_is_directory=True)
    data = make_pascal_release(root / "data")
    cfg = Stage2Config.debug("pascal", str(data), str(root / "s1"), str(root / "run"), online=True, steps=2)
    return train_stage2(cfg).run, data


def test_eval_pads_to_512_saves_seism_files_and_their_odsf_is_the_reported_one(pascal_run, tmp_path, capsys):
    run, data = pascal_run
    weights = (run / "checkpoint/model.safetensors").read_bytes()
    args = ["eval", "--checkpoint", str(run), "--dataset", "pascal", "--data-root", str(data)]
    assert train_main([*args, "--out", str(tmp_path), "--save-predictions", "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "predictions in" in printed and "odsF" in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["protocol"] == {"input": [512, 512], "padding": "centre", "boundaries": "SEISM"}
    assert set(report["metrics"]) == {"semseg", "human_parts", "sal", "normals", "edge"}
    assert (run / "checkpoint/model.safetensors").read_bytes() == weights  # the run is left as it was

    pred = tmp_path / "predictions"
    meter = SeismBoundaryMeter(SEISM_MAX_DIST["pascal_context"])
    for n in IDS:  # the val split: every image, at its own size
        saved = np.asarray(Image.open(pred / "edge/img" / f"{n}.png"))
        assert saved.shape == (H, W) and saved.dtype == np.uint8
        nms = np.asarray(Image.open(pred / "edge/nms" / f"{n}.png"))
        assert np.array_equal(nms, nms_png(saved))
        label_map = loadmat(str(data / "PASCAL_MT/pascal-context/trainval" / f"{n}.mat"))["LabelMap"]
        meter.update_nms(nms, seism_ground_truth(label_map))
        for task, shape in (
            ("sal", (H, W)),
            ("semseg", (H, W, 3)),
            ("human_parts", (H, W, 3)),
            ("normals", (H, W, 3)),
        ):
            assert np.asarray(Image.open(pred / task / f"{n}.png")).shape == shape, task
    assert report["metrics"]["edge"]["value"] == pytest.approx(
        meter.compute()
    )  # the files are what was scored


def test_eval_never_refuses_an_image_larger_than_the_evaluation_size(pascal_run, tmp_path):
    run, data = pascal_run
    big = "2008_000999"  # 26 x 530: wider than 512 -> padded to 512 x 544 (530 rounded up to 16)
    r = data / "PASCAL_MT"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (26, 530, 3), dtype=np.uint8)).save(r / "JPEGImages" / f"{big}.jpg")
    Image.fromarray(rng.integers(0, 21, (26, 530), dtype=np.uint8)).save(
        r / "semseg/pascal-context" / f"{big}.png"
    )
    label_map = np.kron(rng.choice([18, 2, 440], (2, 5)), np.ones((13, 106))).astype(np.uint16)  # 26 x 530
    savemat(r / "pascal-context/trainval" / f"{big}.mat", {"LabelMap": label_map})
    (r / "ImageSets/Context/big.txt").write_text(f"{IDS[0]}\n{big}\n")
    args = [
        "eval",
        "--checkpoint",
        str(run),
        "--dataset",
        "pascal",
        "--data-root",
        str(data),
        "--split",
        "big",
    ]
    args += ["--out", str(tmp_path), "--batch-size", "2"]
    # its other labels: nobody in human_parts, no saliency, flat normals
    nobody = np.array([[(big, np.zeros((1, 0)))]], dtype=[("imname", "O"), ("objects", "O")])
    savemat(r / "human_parts" / f"{big}.mat", {"anno": nobody})
    Image.fromarray(np.zeros((26, 530), np.uint8)).save(r / "sal_distill" / f"{big}.png")
    Image.fromarray(np.full((26, 530, 3), 128, np.uint8)).save(r / "normals_distill" / f"{big}.png")
    assert train_main(args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["images"] == 2 and report["protocol"]["input"] == [512, 512]
    assert all(0 <= m["value"] for m in report["metrics"].values())
