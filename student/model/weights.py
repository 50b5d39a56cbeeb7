"""Student weights on disk: safetensors (never pickle) + a JSON sidecar, and the paper-code converter.

    student.safetensors   every tensor of the student's state_dict(); the config JSON also in its metadata
    student.json          {"kind", "schema_version", "config", "code_version", "weights_sha256", ...}

A run's checkpoint (weights with optimizer, RNG, loader) is student/run/checkpoint.py's; this format is
the student exported on its own (`repsim --checkpoint FILE.safetensors`, the paper converter's output).

The paper's public code names its modules differently; `convert_paper_state_dict` maps its layout
onto ours by keys alone (no shape guessing):

    vit.<rest>                          -> stem.<rest>                  (timm ViT; head/norm unused)
    tsap.<t>.<i>.<scale|down.*|up.*>    -> adapter_paths.<T>.<i>.<...>   i = 0..L
    out_norms.<block>_<t>.<weight|bias> -> level_norms.<T>.<block>.<...> block = 0-based student block
    ts_aligners.<block>_<t>.<...>       -> aligners.<T>.<block>.<...>
where <t> is the paper's teacher name (dinov2, clip, sam) and <T> our registry name from a mapping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import (
    SCHEMA_VERSION,
    atomic_path,
    code_version,
    current_umask,
    read_json,
    sha256_file,
    write_json_atomic,
)
from sak.student.model.config import StudentConfig
from sak.student.model.registry import build_student, student_type, without_pretrained

CHECKPOINT_KIND = "sak-student"
CONFIG_METADATA_KEY = "sak_config"
PAPER_TEACHERS = ("dinov2", "clip", "sam")  # teacher names used by the paper's code
# parts of the paper's timm ViT that SAK never uses (classifier, final norm): dropped, not errors
PAPER_UNUSED_PREFIXES = ("vit.head.", "vit.norm.")


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def _describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str
) -> None:
    """Raise SakError naming the first missing, unexpected or mis-shaped key."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise SakError(f"{source} lacks {len(missing)} student weights: {_describe_keys(missing)}")
    if unexpected:
        raise SakError(
            f"{source} has {len(unexpected)} keys the student does not: {_describe_keys(unexpected)}"
        )
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise SakError(
                f"{source}: {k} has shape {tuple(state_dict[k].shape)}, the student expects {tuple(shape)}"
            )


def load_state_dict_checked(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state_dict, expected, source)
    model.load_state_dict(dict(state_dict), strict=True)


# ----------------------------------------------------------------------------------------------
# our format


def save_student(
    model: torch.nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None
) -> Path:
    """Write weights (atomically, via a temporary file and rename) and then the sidecar. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config), "code_version": code_version()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes the file anew, 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    write_json_atomic(
        sidecar_path(path),
        {
            "kind": CHECKPOINT_KIND,
            "schema_version": SCHEMA_VERSION,
            "config": config,
            "code_version": code_version(),
            "weights_file": path.name,
            "weights_sha256": sha256_file(path),
            "num_parameters": model.num_parameters(include_aligners=True),
            "extra": extra or {},
        },
    )
    return path


def read_student_config(path: str | os.PathLike) -> StudentConfig:
    """Config from the sidecar, or from the safetensors metadata when the sidecar is gone."""
    path = Path(path)
    side = sidecar_path(path)
    if side.exists():
        meta = read_json(side)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise SakError(f"{side} is not a SAK student sidecar (kind {meta.get('kind')!r})")
        return StudentConfig.from_dict(meta["config"])
    if not path.exists():
        raise SakError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    if text is None:
        raise SakError(
            f"{path} has no sidecar {side.name} and no config in its metadata; cannot rebuild the student"
        )
    return StudentConfig.from_dict(json.loads(text))


def load_student_weights(
    model: torch.nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> None:
    """Load a save_student file into an existing model; keys and shapes must match exactly."""
    path = Path(path)
    if not path.exists():
        raise SakError(f"{path} does not exist")
    side = sidecar_path(path)
    if verify and side.exists():
        want = read_json(side).get("weights_sha256")
        if want and sha256_file(path) != want:
            raise SakError(
                f"{path} does not match the checksum in {side.name}; the file is damaged or was replaced"
            )
    load_state_dict_checked(model, load_file(str(path), device=str(device)), str(path))


def load_student(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> torch.nn.Module:
    """Rebuild the student from its recorded config (stem weights come from the file, not timm) and load."""
    model = build_student(without_pretrained(read_student_config(path)))
    model.to(device)
    load_student_weights(model, path, device=device, verify=verify)
    return model


# ----------------------------------------------------------------------------------------------
# the paper code's layout


def _split_level_teacher(part: str, key: str) -> tuple[str, str]:
    block, sep, teacher = part.partition("_")  # "<block>_<teacher>"; our teacher names may hold "_"
    if not sep or not block.isdigit():
        raise SakError(f"paper key {key!r}: expected '<block>_<teacher>' after the module name")
    return block, teacher


def convert_paper_state_dict(
    paper_state_dict: Mapping[str, torch.Tensor],
    teacher_map: Mapping[str, str],
    expected: Mapping[str, torch.Size] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename the paper code's keys to ours. teacher_map: paper name -> our name, e.g. {"dinov2": "dinov2_b"}.

    With `expected` (our key -> shape), also checks that nothing is missing or extra and shapes agree;
    one-element scales are reshaped to the expected shape. Errors name the offending key.
    """

    def teacher(name: str, key: str) -> str:
        if name not in teacher_map:
            raise SakError(
                f"paper key {key!r}: teacher {name!r} has no mapping (known: {sorted(teacher_map)})"
            )
        return teacher_map[name]

    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our key -> paper key, for messages
    for key, value in paper_state_dict.items():
        if key.startswith(PAPER_UNUSED_PREFIXES):
            continue
        head, _, rest = key.partition(".")
        if head == "vit":
            new = f"stem.{rest}"
        elif head == "tsap":
            name, _, tail = rest.partition(".")  # "<t>.<i>.<param>"
            new = f"adapter_paths.{teacher(name, key)}.{tail}"
        elif head in ("out_norms", "ts_aligners"):
            part, _, tail = rest.partition(".")  # "<block>_<t>.<weight|bias>"
            block, name = _split_level_teacher(part, key)
            module = "level_norms" if head == "out_norms" else "aligners"
            new = f"{module}.{teacher(name, key)}.{block}.{tail}"
        else:
            raise SakError(
                f"paper key {key!r} is not part of the stage-1 student layout (vit, tsap, out_norms, ts_aligners)"
            )
        if new in out:
            raise SakError(
                f"paper keys {source[new]!r} and {key!r} both map to {new!r}; check the teacher mapping"
            )
        out[new] = value
        source[new] = key

    if expected is not None:
        missing = [k for k in expected if k not in out]
        if missing:
            raise SakError(
                f"the paper checkpoint lacks {len(missing)} student weights: {_describe_keys(missing)}"
            )
        for new, value in out.items():
            if new not in expected:
                raise SakError(f"paper key {source[new]!r} (as {new!r}) has no place in this student")
            shape = tuple(expected[new])
            if tuple(value.shape) != shape:
                if new.endswith(".scale") and value.numel() == 1 and int(torch.Size(shape).numel()) == 1:
                    out[new] = value.reshape(shape)  # () vs (1,) scalars
                else:
                    raise SakError(
                        f"paper key {source[new]!r} has shape {tuple(value.shape)}, {new} expects {shape}"
                    )
    return out


def read_paper_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A paper-code checkpoint as a flat state_dict: safetensors, or torch.load with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise SakError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise SakError(f"{path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}  # DDP prefix


def load_paper_checkpoint(
    model: torch.nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    teacher_map: Mapping[str, str],
) -> None:
    """Convert a paper-code state_dict (or file) and load it into `model`, strictly."""
    if not student_type(model.config).paper_layout:
        raise SakError(f"student type {model.config.type!r} has no conversion from the paper code's layout")
    sd = source if isinstance(source, Mapping) else read_paper_checkpoint(source)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = convert_paper_state_dict(sd, teacher_map, expected)
    load_state_dict_checked(model, converted, "converted paper checkpoint")
