"""Student checkpoints: safetensors round trip, sidecar, damage detection, paper-layout conversion."""

from __future__ import annotations

import json
import struct

import pytest
import timm
import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.student.model.config import TeacherTarget
from sak.student.model.registry import create_student
from sak.student.model.student import SakStudent
from sak.student.model.weights import (
    convert_paper_state_dict,
    load_paper_checkpoint,
    load_student,
    load_student_weights,
    read_paper_checkpoint,
    read_student_config,
    save_student,
    sidecar_path,
)

# paper name -> (our name, width); 64 is the tiny student's width, so dinov2 gets no aligner
PAPER_TEACHERS = {"dinov2": ("dinov2_tiny", 64), "clip": ("clip_tiny", 96), "sam": ("sam_tiny", 48)}
TEACHER_MAP = {p: ours for p, (ours, _) in PAPER_TEACHERS.items()}
TEACHERS = [TeacherTarget(ours, dim) for ours, dim in PAPER_TEACHERS.values()]
DIM, DEPTH, LEVELS, IMG = 64, 4, [0, 1, 2, 3], 64


def _randomized_tiny(seed: int = 0) -> SakStudent:
    torch.manual_seed(seed)
    m = create_student("tiny", TEACHERS, img_size=IMG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def _outputs(m: SakStudent, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        return m(x).distill_maps


def _assert_same_outputs(a, b):
    assert list(a) == list(b)
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- our format


def test_round_trip_and_sidecar(tmp_path):
    m = _randomized_tiny()
    x = torch.randn(2, 3, IMG, IMG)
    path = save_student(m, tmp_path / "ckpt" / "student.safetensors", extra={"epoch": 3})
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, then JSON
    header = json.loads(raw[8 : 8 + header_len])
    assert "stem.pos_embed" in header and "__metadata__" in header
    side = json.loads(sidecar_path(path).read_text())
    assert side["kind"] == "sak-student" and side["extra"] == {"epoch": 3}
    assert side["config"]["name"] == "tiny" and side["config"]["teachers"][1] == {
        "name": "clip_tiny",
        "dim": 96,
    }
    assert side["code_version"] and len(side["weights_sha256"]) == 64
    assert not list(path.parent.glob("*.tmp"))

    loaded = load_student(path)
    _assert_same_outputs(_outputs(m, x), _outputs(loaded, x))
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_config_from_metadata_when_sidecar_lost(tmp_path):
    m = _randomized_tiny()
    path = save_student(m, tmp_path / "s.safetensors")
    sidecar_path(path).unlink()
    assert read_student_config(path) == m.config
    _assert_same_outputs(
        _outputs(m, torch.ones(1, 3, IMG, IMG)), _outputs(load_student(path), torch.ones(1, 3, IMG, IMG))
    )


def test_damaged_or_mismatched_checkpoint_is_refused(tmp_path):
    m = _randomized_tiny()
    path = save_student(m, tmp_path / "s.safetensors")
    other = create_student("tiny", TEACHERS[:2], img_size=IMG)
    with pytest.raises(SakError, match="sam_tiny"):  # names an unexpected key
        load_student_weights(other, path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SakError, match="checksum"):
        load_student(path)
    with pytest.raises(SakError, match="does not exist"):
        load_student(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------- paper layout


def _paper_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The paper code's keys and shapes for a tiny student with three teachers, random values."""
    g = torch.Generator().manual_seed(seed)
    vit = timm.create_model(
        "vit_small_patch16_384",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
    )
    sd = {f"vit.{k}": v for k, v in vit.state_dict().items() if not k.startswith("norm.")}
    r = DIM // 4
    for t, (_, tdim) in PAPER_TEACHERS.items():
        for i in range(DEPTH + 1):
            sd[f"tsap.{t}.{i}.scale"] = torch.ones(1)
            sd[f"tsap.{t}.{i}.down.weight"] = torch.empty(r, DIM)
            sd[f"tsap.{t}.{i}.down.bias"] = torch.empty(r)
            sd[f"tsap.{t}.{i}.up.weight"] = torch.empty(DIM, r)
            sd[f"tsap.{t}.{i}.up.bias"] = torch.empty(DIM)
        for b in LEVELS:
            sd[f"out_norms.{b}_{t}.weight"] = torch.empty(DIM)
            sd[f"out_norms.{b}_{t}.bias"] = torch.empty(DIM)
            if tdim != DIM:
                sd[f"ts_aligners.{b}_{t}.weight"] = torch.empty(tdim, DIM)
                sd[f"ts_aligners.{b}_{t}.bias"] = torch.empty(tdim)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in sd.items()}


def _paper_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The method computed straight from the paper's tensors (eq. 1-3, level norms, aligners)."""
    vit = timm.create_model(
        "vit_small_patch16_384",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
    )
    vit.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vit.")}, strict=False)
    vit.eval()
    z = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    zs = [z]
    for blk in vit.blocks:
        zs.append(blk(zs[-1]))
    out = {}
    for t, (ours, _) in PAPER_TEACHERS.items():

        def a(u, i, t=t):
            p = f"tsap.{t}.{i}."
            h = F.gelu(u @ sd[p + "down.weight"].T + sd[p + "down.bias"])
            return u + sd[p + "scale"] * (h @ sd[p + "up.weight"].T + sd[p + "up.bias"])

        r = a(zs[0], 0)
        rs = [r]
        for i in range(1, DEPTH + 1):
            r = a(r + zs[i], i)
            rs.append(r)
        maps = []
        for b in LEVELS:
            y = F.layer_norm(
                rs[b + 1][:, 1:],
                (DIM,),
                sd[f"out_norms.{b}_{t}.weight"],
                sd[f"out_norms.{b}_{t}.bias"],
                eps=1e-5,
            )
            if f"ts_aligners.{b}_{t}.weight" in sd:
                y = y @ sd[f"ts_aligners.{b}_{t}.weight"].T + sd[f"ts_aligners.{b}_{t}.bias"]
            B, N, C = y.shape
            maps.append(y.reshape(B, IMG // 16, IMG // 16, C).permute(0, 3, 1, 2))
        out[ours] = maps
    return out


def test_paper_conversion_puts_every_tensor_in_place(tmp_path):
    paper = _paper_state_dict()
    m = create_student("tiny", TEACHERS, img_size=IMG).eval()
    load_paper_checkpoint(m, paper, TEACHER_MAP)

    # every paper tensor, looked up through module attributes rather than key strings
    checked = 0
    for t, (ours, tdim) in PAPER_TEACHERS.items():
        for i in range(DEPTH + 1):
            a = m.adapter_paths[ours][i]
            for name, param in [
                ("scale", a.scale),
                ("down.weight", a.down.weight),
                ("down.bias", a.down.bias),
                ("up.weight", a.up.weight),
                ("up.bias", a.up.bias),
            ]:
                assert torch.equal(param, paper[f"tsap.{t}.{i}.{name}"])
                checked += 1
        for b in LEVELS:
            ln = m.level_norms[ours][str(b)]
            assert torch.equal(ln.weight, paper[f"out_norms.{b}_{t}.weight"]) and torch.equal(
                ln.bias, paper[f"out_norms.{b}_{t}.bias"]
            )
            checked += 2
            if tdim != DIM:
                lin = m.aligners[ours][str(b)]
                assert torch.equal(lin.weight, paper[f"ts_aligners.{b}_{t}.weight"])
                assert torch.equal(lin.bias, paper[f"ts_aligners.{b}_{t}.bias"])
                checked += 2
    stem_sd = m.stem.state_dict()
    for k, v in paper.items():
        if k.startswith("vit."):
            assert torch.equal(stem_sd[k.removeprefix("vit.")], v), k
            checked += 1
    assert checked == len(paper)
    assert "aligners.dinov2_tiny.0.weight" not in m.state_dict()  # same width: no aligner

    # the model computes what the paper's tensors compute
    x = torch.randn(2, 3, IMG, IMG)
    got = _outputs(m, x)
    with torch.no_grad():
        want = _paper_forward(paper, x)
    for ours in got:
        for g, w in zip(got[ours], want[ours]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    # and survives a safetensors round trip unchanged
    path = save_student(m, tmp_path / "converted.safetensors")
    _assert_same_outputs(got, _outputs(load_student(path), x))


def test_paper_checkpoint_file_with_wrappers(tmp_path):
    paper = _paper_state_dict()
    paper["vit.head.weight"] = torch.zeros(1000, DIM)  # the unused classifier is dropped, not an error
    paper["vit.head.bias"] = torch.zeros(1000)
    paper["tsap.clip.0.scale"] = torch.tensor(0.5)  # a 0-d scale becomes our (1,)
    path = tmp_path / "paper.pth"
    torch.save({"model": {f"module.{k}": v for k, v in paper.items()}, "epoch": 29}, path)
    sd = read_paper_checkpoint(path)
    assert "tsap.sam.4.up.bias" in sd
    m = create_student("tiny", TEACHERS, img_size=IMG)
    load_paper_checkpoint(m, path, TEACHER_MAP)
    assert (
        m.adapter_paths["clip_tiny"][0].scale.shape == (1,)
        and m.adapter_paths["clip_tiny"][0].scale.item() == 0.5
    )


def test_paper_conversion_errors_name_the_key():
    m = create_student("tiny", TEACHERS, img_size=IMG)
    paper = _paper_state_dict()
    with pytest.raises(SakError, match=r"tsap\.sam\.0\.scale.*teacher 'sam' has no mapping"):
        convert_paper_state_dict(paper, {"dinov2": "dinov2_tiny", "clip": "clip_tiny"})

    missing = dict(paper)
    del missing["out_norms.2_clip.bias"]
    with pytest.raises(SakError, match=r"level_norms\.clip_tiny\.2\.bias"):
        load_paper_checkpoint(m, missing, TEACHER_MAP)

    extra = dict(paper)
    extra["routers.semseg.0.weight"] = torch.zeros(1)
    with pytest.raises(SakError, match=r"routers\.semseg\.0\.weight"):
        load_paper_checkpoint(m, extra, TEACHER_MAP)

    no_place = dict(paper)
    no_place["ts_aligners.0_dinov2.weight"] = torch.zeros(64, 64)  # our same-width teacher has no aligner
    with pytest.raises(SakError, match=r"ts_aligners\.0_dinov2\.weight"):
        load_paper_checkpoint(m, no_place, TEACHER_MAP)

    bad_shape = dict(paper)
    bad_shape["tsap.dinov2.3.down.weight"] = torch.zeros(8, DIM)
    with pytest.raises(SakError, match=r"tsap\.dinov2\.3\.down\.weight.*\(8, 64\)"):
        load_paper_checkpoint(m, bad_shape, TEACHER_MAP)

    bad_level = dict(paper)
    bad_level["out_norms.x_clip.weight"] = bad_level.pop("out_norms.0_clip.weight")
    with pytest.raises(SakError, match=r"out_norms\.x_clip\.weight"):
        load_paper_checkpoint(m, bad_level, TEACHER_MAP)
