"""What `--weights NAME=PATH` accepts besides a timm state_dict (docs/teachers.md): the original releases'
layouts that timm's own checkpoint filters convert. Each test writes a file in the release's key layout
from a random timm model, loads it through the project's loader, and checks every tensor arrived."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import save_file

from sak.pipeline.teachers.forward import load_teacher
from sak.pipeline.teachers.specs import get_teacher
from sak.pipeline.teachers.weights import WeightsChoice


def _reference(name: str, side: int, seed: int = 7) -> tuple[object, torch.nn.Module]:
    spec = get_teacher(name)
    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=side, **dict(spec.model_kwargs))
    return spec, model.eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_the_original_sam_checkpoint_layout_loads(tmp_path):
    """segment-anything's sam_vit_*.pth: the image encoder under `image_encoder.`, MLPs as `lin1/lin2`,
    beside the prompt encoder and mask decoder (dropped)."""
    spec, ref = _reference("sam_tiny", 256)
    original = {
        "image_encoder." + k.replace("mlp.fc", "mlp.lin"): v.clone() for k, v in ref.state_dict().items()
    }
    original["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    original["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(original, path)
    teacher = load_teacher(spec, WeightsChoice("file", str(path)), 256)
    _assert_same_weights(teacher.model, ref)


def test_the_original_dinov2_checkpoint_layout_loads(tmp_path):
    """facebookresearch/dinov2's dinov2_vit*14_pretrain.pth: timm's names plus the `mask_token`."""
    spec, ref = _reference("dinov2_tiny", 112)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    original["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_tiny_pretrain.safetensors"
    save_file(original, path)
    teacher = load_teacher(spec, WeightsChoice("file", str(path)), 112)
    _assert_same_weights(teacher.model, ref)
