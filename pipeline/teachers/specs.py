"""Teacher registry: frozen vision foundation models (DINOv2, CLIP, SAM) with multi-level taps.

A teacher target is the raw residual stream after a tapped block: prefix tokens (CLS, registers) dropped,
no final norm, laid out (B, H, W, C). Levels are 4 evenly spaced blocks, 0-based: [2, 5, 8, 11] for
12-block models, [5, 11, 17, 23] for 24-block ones. Every teacher sees the planned view at the plan size
except SAM, which sees it resized so its long side is 1024 and zero-padded to 1024x1024 (after
normalisation, as SAM's own preprocessing pads).

Weights come from one of three places, and which one is part of the store's fingerprint:
  pretrained  timm's hub weights for the recorded tag (needs network access or a warm HF cache)
  file        a local .safetensors (or .pth, read with weights_only=True) given by --weights NAME=PATH
  random      random init from a seed: for tests and offline demos only, flagged loudly everywhere
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file

log = logging.getLogger(__name__)


def normalize_u8(
    images_u8: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """The one input normalisation: (B, 3, H, W) uint8 -> float32 (x / 255 - mean) / std per channel.
    Used by the teachers (extraction, online, stage 2), the student loader and the stage-2 datasets."""
    # one widening copy and one in-place multiply-add (2.7x faster on one core than three passes; within
    # float32 rounding of (x / 255 - mean) / std); any input strides, contiguous output
    out = torch.empty(images_u8.shape, dtype=torch.float32, device=images_u8.device)
    out.copy_(images_u8)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    return out.mul_(1.0 / (255.0 * std)).add_(-mean / std)


def bf16_autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU a no-op context (the model runs in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_SELECTION = "patch tokens after the block, prefix tokens dropped, no final norm"


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # registry name, e.g. "dinov2_l"
    family: str  # "dinov2" | "clip" | "sam"
    timm_name: str  # timm architecture
    pretrained_tag: str | None  # timm pretrained tag whose weights and mean/std are used
    depth: int
    dim: int
    patch_size: int
    levels: tuple[int, ...]  # 0-based block indices whose outputs are stored
    fixed_input: int | None = None  # SAM: long side of its input; None: the view plan's size
    model_kwargs: tuple[tuple[str, object], ...] = ()  # overrides of the timm architecture (tiny variants)
    tiny: bool = False  # a narrow random-init variant for tests and the offline demo

    def input_hw(self, plan_size: int) -> tuple[int, int]:
        """(h, w) of the image the model sees (before padding)."""
        side = self.fixed_input or plan_size
        return (side, side)  # views are square; SAM's resize of the long side is then the whole side

    def model_input_side(self, plan_size: int) -> int:
        return self.fixed_input or plan_size

    def grid(self, plan_size: int) -> tuple[int, int]:
        side = self.model_input_side(plan_size) // self.patch_size
        return (side, side)


_REGISTRY: dict[str, Callable[[], TeacherSpec]] = {}


def register_teacher(name: str):
    def wrap(fn: Callable[[], TeacherSpec]) -> Callable[[], TeacherSpec]:
        if name in _REGISTRY:
            raise ValueError(f"teacher {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def teacher_names() -> list[str]:
    return sorted(_REGISTRY)


def get_teacher(name: str) -> TeacherSpec:
    if name not in _REGISTRY:
        raise SakError(f"unknown teacher {name!r}; known teachers: {', '.join(teacher_names())}")
    return _REGISTRY[name]()


def parse_teachers(text: str | list[str]) -> list[TeacherSpec]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise SakError(
            f"no teacher given; pass --teachers with a comma list of: {', '.join(teacher_names())}"
        )
    if len(set(names)) != len(names):
        raise SakError(f"a teacher is listed twice in --teachers {','.join(names)}")
    return [get_teacher(n) for n in names]


def tap_levels(depth: int) -> list[int]:
    """The one level-tap rule, for teachers and the student alike: 0-based block indices after L/4, L/2,
    3L/4 and L blocks ([2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24)."""
    if depth < 4 or depth % 4:
        raise SakError(f"a model of depth {depth} cannot be tapped at L/4, L/2, 3L/4, L; use a multiple of 4")
    return [depth * k // 4 - 1 for k in (1, 2, 3, 4)]


def _vit(name, family, timm_name, tag, depth, dim, patch, **kw) -> TeacherSpec:
    return TeacherSpec(name, family, timm_name, tag, depth, dim, patch, tuple(tap_levels(depth)), **kw)


@register_teacher("dinov2_b")
def _dinov2_b():
    return _vit("dinov2_b", "dinov2", "vit_base_patch14_dinov2", "lvd142m", 12, 768, 14)


@register_teacher("dinov2_l")
def _dinov2_l():
    return _vit("dinov2_l", "dinov2", "vit_large_patch14_dinov2", "lvd142m", 24, 1024, 14)


# note: timm's default tags for these CLIP towers are fine-tuned on ImageNet-12k/1k, not raw CLIP. The
# tag is recorded in the fingerprint, so a cache of another tag is a different store.
@register_teacher("clip_b")
def _clip_b():
    return _vit("clip_b", "clip", "vit_base_patch16_clip_384", "laion2b_ft_in12k_in1k", 12, 768, 16)


@register_teacher("clip_l")
def _clip_l():
    return _vit("clip_l", "clip", "vit_large_patch14_clip_336", "laion2b_ft_in12k_in1k", 24, 1024, 14)


@register_teacher("sam_b")
def _sam_b():
    return _vit("sam_b", "sam", "samvit_base_patch16", "sa1b", 12, 768, 16, fixed_input=1024)


@register_teacher("sam_l")
def _sam_l():
    return _vit("sam_l", "sam", "samvit_large_patch16", "sa1b", 24, 1024, 16, fixed_input=1024)


# Tiny variants: the real architectures, narrowed to 4 blocks of width 64, always random-init. DINOv2's
# LayerScale would start at 1e-5 and make every level of a random model the same, so it starts at 1.
_TINY = (("embed_dim", 64), ("depth", 4), ("num_heads", 2))


@register_teacher("dinov2_tiny")
def _dinov2_tiny():
    kw = _TINY + (("init_values", 1.0),)
    return _vit(
        "dinov2_tiny", "dinov2", "vit_base_patch14_dinov2", None, 4, 64, 14, model_kwargs=kw, tiny=True
    )


@register_teacher("clip_tiny")
def _clip_tiny():
    return _vit(
        "clip_tiny", "clip", "vit_base_patch16_clip_384", None, 4, 64, 16, model_kwargs=_TINY, tiny=True
    )


@register_teacher("sam_tiny")
def _sam_tiny():
    kw = _TINY + (("window_size", 8), ("global_attn_indexes", (1, 3)))
    return _vit(
        "sam_tiny", "sam", "samvit_base_patch16", None, 4, 64, 16, fixed_input=256, model_kwargs=kw, tiny=True
    )


# ---------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightsChoice:
    """Where a teacher's weights come from: "pretrained", "file" (path) or "random" (seed)."""

    kind: str
    path: str | None = None
    seed: int = 0

    def describe(self, spec: TeacherSpec) -> dict:
        """The record that goes into the fingerprint and the manifest."""
        if self.kind == "random":
            return {"source": "random", "id": f"random init, seed {self.seed}", "random_init": True}
        if self.kind == "file":
            return {
                "source": "file",
                "id": f"sha256:{sha256_file(self.path)}",
                "path": str(self.path),
                "random_init": False,
            }
        return {
            "source": "pretrained",
            "id": f"timm:{spec.timm_name}.{spec.pretrained_tag}",
            "random_init": False,
        }


def resolve_weights(
    specs: list[TeacherSpec], files: dict[str, str], random_init: bool, seed: int
) -> dict[str, WeightsChoice]:
    """Pick each teacher's weights: --weights NAME=PATH, else random (tiny or --random-init), else hub."""
    unknown = set(files) - {s.name for s in specs}
    if unknown:
        raise SakError(f"--weights names {', '.join(sorted(unknown))}, which is not among --teachers")
    out = {}
    for spec in specs:
        if spec.name in files:
            path = Path(files[spec.name]).expanduser()
            if not path.is_file():
                raise SakError(f"--weights {spec.name}={path}: no such file")
            if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
                raise SakError(f"--weights {spec.name}={path}: expected a .safetensors or .pth file")
            out[spec.name] = WeightsChoice("file", str(path.resolve()))
        elif random_init or spec.tiny:
            out[spec.name] = WeightsChoice("random", seed=seed)
        else:
            out[spec.name] = WeightsChoice("pretrained")
    return out


def normalization_for(spec: TeacherSpec, mode: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the teacher was trained with (its timm pretrained_cfg), or ImageNet's ("imagenet")."""
    if mode == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if mode != "teacher":
        raise SakError(f"unknown --normalization {mode!r}; use 'teacher' or 'imagenet'")
    import timm

    cfg_name = spec.timm_name + (f".{spec.pretrained_tag}" if spec.pretrained_tag else "")
    cfg = timm.models.get_pretrained_cfg(cfg_name) or timm.models.get_pretrained_cfg(spec.timm_name)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    return sd


def build_model(spec: TeacherSpec, choice: WeightsChoice, plan_size: int) -> torch.nn.Module:
    """The timm model of a teacher with its weights, in eval mode, gradients off."""
    import timm

    kwargs = dict(spec.model_kwargs)
    kwargs["img_size"] = spec.model_input_side(plan_size)
    name = spec.timm_name
    if choice.kind == "pretrained":
        try:
            model = timm.create_model(f"{name}.{spec.pretrained_tag}", pretrained=True, **kwargs)
        except Exception as e:  # network, hub or cache failures all end here
            raise SakError(
                f"could not load pretrained weights for {spec.name} (timm {name}.{spec.pretrained_tag}): "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}; pass --weights {spec.name}=PATH for a "
                f"local file, or --random-init for a test run"
            ) from e
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(choice.seed)
            model = timm.create_model(name, pretrained=False, **kwargs)
        if choice.kind == "file":
            _load_file(model, spec, choice.path)
    return model.eval().requires_grad_(False)


def _load_file(model: torch.nn.Module, spec: TeacherSpec, path: str) -> None:
    import importlib

    sd = _read_state_dict(path)
    # timm's own filter converts original-format checkpoints and resamples position embeddings
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if missing or result.unexpected_keys:
        raise SakError(
            f"--weights {spec.name}={path} does not fit {spec.timm_name}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; pass a checkpoint of that architecture"
        )


# ---------------------------------------------------------------------------------------------- forward


@dataclass
class LoadedTeacher:
    spec: TeacherSpec
    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    plan_size: int
    weights: dict = field(default_factory=dict)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.spec.input_hw(self.plan_size)

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid(self.plan_size)

    def prepare(self, views_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) uint8 views -> normalised float model input; a teacher with a fixed input side
        (SAM) gets it zero-padded right and bottom to that square, after normalisation (as SAM pads)."""
        x = normalize_u8(views_u8, self.mean, self.std)
        side = self.spec.fixed_input
        if side and (x.shape[-2] != side or x.shape[-1] != side):
            x = F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
        return x

    @torch.inference_mode()
    def forward_levels(
        self, views_u8: torch.Tensor, blocks: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """(B, 3, h, w) uint8 -> one (B, h', w', C) float32 map per block of `blocks` (default: every tap
        in `spec.levels`), shallowest first. The model stops after the deepest block asked for, so a store
        that keeps only shallow levels never pays for the deeper blocks (`estimate` bills the same)."""
        blocks = sorted(self.spec.levels if blocks is None else blocks)
        x = self.prepare(views_u8)
        with bf16_autocast(x.device):
            maps = self.model.forward_intermediates(
                x, indices=list(blocks), norm=False, stop_early=True, intermediates_only=True
            )  # [(B, C, h', w')] patch maps, prefix tokens dropped (SAM and ViTs alike)
        return [m.permute(0, 2, 3, 1).float() for m in maps]


def load_teacher(
    spec: TeacherSpec,
    choice: WeightsChoice,
    plan_size: int,
    normalization: str = "teacher",
    device: str = "cpu",
) -> LoadedTeacher:
    mean, std = normalization_for(spec, normalization)
    model = build_model(spec, choice, plan_size).to(device)
    return LoadedTeacher(spec, model, mean, std, plan_size)


def parse_weights(text: str) -> tuple[str, str]:
    """`--weights NAME=PATH` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SakError(
            f"--weights {text!r} must look like NAME=PATH, e.g. dinov2_l=/ckpt/dinov2_l.safetensors"
        )
    return name.strip(), path.strip()


def weights_field(help: str, **metadata):
    """The `--weights NAME=PATH` option (repeatable) of every command that loads named teachers."""
    return field(
        default=(),
        metadata={"help": help, "multiple": True, "parse": parse_weights, "metavar": "NAME=PATH", **metadata},
    )
