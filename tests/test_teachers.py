"""Every registered teacher builds and taps 4 levels of the right shape; weights load from local files."""

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import save_file

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.forward import load_teacher, normalization_for
from sak.pipeline.teachers.specs import get_teacher, parse_teachers, teacher_names
from sak.pipeline.teachers.weights import WeightsChoice, resolve_weights

EXPECTED = {  # name: (timm name, levels, width, patch)
    "dinov2_b": ("vit_base_patch14_dinov2", (2, 5, 8, 11), 768, 14),
    "dinov2_l": ("vit_large_patch14_dinov2", (5, 11, 17, 23), 1024, 14),
    "clip_b": ("vit_base_patch16_clip_384", (2, 5, 8, 11), 768, 16),
    "clip_l": ("vit_large_patch14_clip_336", (5, 11, 17, 23), 1024, 14),
    "sam_b": ("samvit_base_patch16", (2, 5, 8, 11), 768, 16),
    "sam_l": ("samvit_large_patch16", (5, 11, 17, 23), 1024, 16),
    "dinov2_tiny": ("vit_base_patch14_dinov2", (0, 1, 2, 3), 64, 14),
    "clip_tiny": ("vit_base_patch16_clip_384", (0, 1, 2, 3), 64, 16),
    "sam_tiny": ("samvit_base_patch16", (0, 1, 2, 3), 64, 16),
}


def test_registry_is_complete():
    assert sorted(EXPECTED) == teacher_names()
    with pytest.raises(SakError, match=r"unknown teacher 'dinov3_l'; known teachers: clip_b, "):
        get_teacher("dinov3_l")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_describes_the_timm_architecture_estimate_bills(name):
    """What `estimate` counts (depth, width, patch, prefix tokens, MLP ratio, attention windows) is the
    spec's, so each spec must agree with the model timm builds (on the meta device: no weights, no time)."""
    spec = get_teacher(name)
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=224, **dict(spec.model_kwargs))
    assert (len(model.blocks), model.embed_dim, model.patch_embed.patch_size) == (
        spec.depth, spec.dim, (spec.patch_size, spec.patch_size)
    )  # fmt: skip
    assert getattr(model, "num_prefix_tokens", 0) == spec.prefix_tokens  # SAM has no CLS token
    assert all(b.mlp.fc1.out_features == spec.mlp_ratio * spec.dim for b in model.blocks)
    windows = [getattr(b, "window_size", 0) or None for b in model.blocks]  # timm's 0 / None: global
    expected = [None if b in spec.global_blocks else spec.attention_window for b in range(spec.depth)]
    assert windows == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_teacher_shapes_with_random_weights(name):
    spec = get_teacher(name)
    timm_name, levels, dim, patch = EXPECTED[name]
    assert (spec.timm_name, spec.levels, spec.dim, spec.patch_size) == (timm_name, levels, dim, patch)
    if spec.family == "sam":
        assert spec.fixed_input == (256 if spec.tiny else 1024)
        if not spec.tiny:  # the real 1024 input is too slow for a unit test; the taps are the same
            spec = dataclasses.replace(spec, fixed_input=128)
    plan_size = 56 if patch == 14 else 64
    teacher = load_teacher(spec, WeightsChoice("random", seed=0), plan_size)
    h, w = teacher.input_hw
    maps = teacher.forward_levels(torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8))
    grid = spec.grid(plan_size)
    assert grid == (spec.model_input_side(plan_size) // patch,) * 2
    assert [tuple(m.shape) for m in maps] == [(2, *grid, dim)] * 4
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps)
    assert not torch.allclose(maps[0], maps[-1])  # the levels are different blocks


def test_real_grids_at_the_paper_resolution():
    assert get_teacher("dinov2_l").grid(384) == (27, 27)
    assert get_teacher("clip_b").grid(384) == (24, 24)
    assert get_teacher("clip_l").grid(384) == (27, 27)
    assert get_teacher("sam_l").grid(384) == (64, 64)


def test_unknown_teacher_lists_known_ones():
    with pytest.raises(SakError, match="unknown teacher 'dino'.*dinov2_b"):
        parse_teachers("dino,clip_b")
    with pytest.raises(SakError, match="twice"):
        parse_teachers("clip_b,clip_b")


def test_normalization_per_teacher_and_imagenet():
    assert normalization_for(get_teacher("clip_l"), "teacher") == ((0.5,) * 3, (0.5,) * 3)
    assert normalization_for(get_teacher("clip_b"), "teacher")[0][0] == pytest.approx(0.48145466)
    assert normalization_for(get_teacher("clip_l"), "imagenet")[0] == (0.485, 0.456, 0.406)


def test_weights_resolution():
    specs = parse_teachers("dinov2_l,clip_tiny")
    choice = resolve_weights(specs, {}, random_init=False, seed=3)
    assert choice["dinov2_l"].kind == "pretrained" and choice["clip_tiny"] == WeightsChoice("random", seed=3)
    assert resolve_weights(specs, {}, random_init=True, seed=3)["dinov2_l"].kind == "random"
    with pytest.raises(SakError, match="not among --teachers"):
        resolve_weights(specs, {"sam_b": "x.safetensors"}, False, 0)
    with pytest.raises(SakError, match="no such file"):
        resolve_weights(specs, {"dinov2_l": "/nonexistent.safetensors"}, False, 0)
    assert WeightsChoice("random", seed=3).record(specs[0]).random_init is True


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    spec = get_teacher("clip_tiny")
    torch.manual_seed(99)
    ref = timm.create_model(spec.timm_name, pretrained=False, img_size=64, **dict(spec.model_kwargs)).eval()
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, path) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    teacher = load_teacher(spec, WeightsChoice("file", str(path)), 64)
    for a, b in zip(teacher.model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    other = load_teacher(spec, WeightsChoice("random", seed=1), 64)
    assert not torch.equal(other.model.state_dict()["cls_token"], ref.state_dict()["cls_token"])
    record = WeightsChoice("file", str(path)).record(spec)
    assert record.id.startswith("sha256:") and record.random_init is False and record.path == str(path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"foo": torch.zeros(2)}, path)
    with pytest.raises(SakError, match="does not fit"):
        load_teacher(get_teacher("clip_tiny"), WeightsChoice("file", str(path)), 64)


def test_sam_input_is_padded_after_normalisation():
    spec = dataclasses.replace(get_teacher("sam_tiny"))
    teacher = load_teacher(spec, WeightsChoice("random", seed=0), 64)
    views = torch.full((1, 3, 200, 256), 255, dtype=torch.uint8)  # a non-square (wide) view
    x = teacher.prepare(views)
    assert x.shape == (1, 3, 256, 256)
    assert torch.all(x[:, :, 200:] == 0) and torch.all(x[:, :, :200] > 0)
