"""Where a teacher's weights come from, and the timm model built with them. Which source is part of the
store's fingerprint:

  pretrained  timm's hub weights for the recorded tag (needs network access or a warm HF cache)
  file        a local .safetensors (or .pth, read with weights_only=True) given by --weights NAME=PATH
  random      random init from a seed: for tests and offline demos only, flagged loudly everywhere

torch and timm are imported when a model is built, so the `--weights` option costs a command nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file
from sak.pipeline.format.records import WeightsRecord
from sak.pipeline.teachers.specs import TeacherSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WeightsChoice:
    """Where a teacher's weights come from: "pretrained", "file" (path) or "random" (seed)."""

    kind: str
    path: str | None = None
    seed: int = 0

    def record(self, spec: TeacherSpec) -> WeightsRecord:
        """What goes into the store's fingerprint (its `id`) and manifest."""
        if self.kind == "random":
            return WeightsRecord(source="random", id=f"random init, seed {self.seed}", random_init=True)
        if self.kind == "file":
            return WeightsRecord(
                source="file", id=f"sha256:{sha256_file(self.path)}", path=str(self.path), random_init=False
            )
        return WeightsRecord(
            source="pretrained", id=f"timm:{spec.timm_name}.{spec.pretrained_tag}", random_init=False
        )


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


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    import torch

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
    import torch

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


def check_weights_load(spec: TeacherSpec, choice: WeightsChoice, plan_size: int) -> None:
    """Load a teacher's hub or file weights once (on the driver, before any image is ingested), so a
    missing download or a corrupt file is one line before any work; random init has nothing to fail."""
    if choice.kind != "random":
        build_model(spec, choice, plan_size)


def _load_file(model: torch.nn.Module, spec: TeacherSpec, path: str) -> None:
    import importlib

    try:
        sd = _read_state_dict(path)
    except Exception as e:  # safetensors, torch and pickle-refusal errors each have their own types
        first = (str(e).splitlines() or [""])[0][:200]
        raise SakError(
            f"--weights {spec.name}={path} cannot be read ({type(e).__name__}: {first}); "
            f"pass an intact .safetensors or .pth file"
        ) from e
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
