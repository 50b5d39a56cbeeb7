"""The authors' PRISM checkpoints (github robotyingtang/PRISM-VFM, Hugging Face robotyingtang/PRISM-VFM)
converted onto PrismStudent by a fixed key table (no shape guessing).

Released files hold {"model": state_dict}. Stage 1 is their `Condition_MoE_PRISM`; stage 2 their
`MultiTaskModel`, i.e. the same under `backbone.` plus `heads.<task>.*`. Their layout -> ours:

    backbone.blocks.<i>.standard_ffn.*                      -> stem.blocks.<i>.dense_ffn.*
    backbone.blocks.<i>.moe_ffn_layer.shared_expert.*       -> stem.blocks.<i>.moe.shared_expert.*
    backbone.blocks.<i>.moe_ffn_layer.experts.<e>.*         -> stem.blocks.<i>.moe.experts.<e>.*
    backbone.blocks.<i>.moe_ffn_layer.router.film_layer.to_gamma_beta.* -> ...moe.router.film.*
    backbone.blocks.<i>.moe_ffn_layer.router.W_gate_stage1.*            -> ...moe.router.film_gate.*
    backbone.blocks.<i>.moe_ffn_layer.router.W_g_base.*                 -> ...moe.router.logits.*
    backbone.blocks.<i>.moe_ffn_layer.router.W_noise.*                  -> ...moe.router.noise.*
    backbone.blocks.<i>.gate_linear.*                       -> stem.blocks.<i>.stream_gate.*
    backbone.<rest> (patch/pos embed, CLS, dense blocks, final norm)    -> stem.<rest>
    vfm_condition_embeddings.weight   (T, C) row = their teacher id     -> teacher_embeddings.weight
    task_condition_embeddings.weight  (K, C) row = their task order     -> task_embeddings.weight
    vfm_projection_heads.<id>_<level>.net.{0,2}.*           -> projectors.<teacher>.<block>.{fc1,fc2}.*
Dropped (never read by their forward): task_composer_weights, task_free_condition_embeddings.weight and
each MoE layer's ortho_loss_weight / variance_loss_weight buffers. Their teacher ids are the order of
`teachers:` in their config (dinov2, clip, sam); `teacher_order` names our teacher for each id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismStudent
from sak.student.model.weights import check_state_dict, read_paper_checkpoint

AUTHORS_UNUSED_KEYS = ("task_composer_weights", "task_free_condition_embeddings.weight")
AUTHORS_UNUSED_SUFFIXES = (".moe_ffn_layer.ortho_loss_weight", ".moe_ffn_layer.variance_loss_weight")
# their task list order (configs/s2_prism/*.yml task_dict), which indexes task_condition_embeddings
AUTHORS_TASK_ORDER: dict[str, tuple[str, ...]] = {
    "pascal_context": ("semseg", "human_parts", "normals", "edge", "sal"),
    "nyud": ("semseg", "normals", "edge", "depth"),
}
_MOE_RENAMES = (
    ("standard_ffn.", "dense_ffn."),
    ("moe_ffn_layer.shared_expert.", "moe.shared_expert."),
    ("moe_ffn_layer.experts.", "moe.experts."),
    ("moe_ffn_layer.router.film_layer.to_gamma_beta.", "moe.router.film."),
    ("moe_ffn_layer.router.W_gate_stage1.", "moe.router.film_gate."),
    ("moe_ffn_layer.router.W_g_base.", "moe.router.logits."),
    ("moe_ffn_layer.router.W_noise.", "moe.router.noise."),
    ("gate_linear.", "stream_gate."),
)
_PROJECTOR_LAYERS = {"net.0.": "fc1.", "net.2.": "fc2."}


def _rename_backbone(rest: str) -> str:
    """`blocks.<i>.<their module>...` and the stem's other keys -> ours, after `backbone.`."""
    if rest.startswith("blocks."):
        _, index, tail = rest.split(".", 2)
        for theirs, ours in _MOE_RENAMES:
            if tail.startswith(theirs):
                return f"stem.blocks.{index}.{ours}{tail[len(theirs) :]}"
    return f"stem.{rest}"


def _projector_key(key: str, rest: str, teachers: Sequence[str], blocks: Sequence[int]) -> str:
    head, _, tail = rest.partition(".")  # "<id>_<level>", "net.<0|2>.<param>"
    tid, sep, level = head.partition("_")
    if not sep or not tid.isdigit() or not level.isdigit():
        raise SakError(f"authors' key {key!r}: expected vfm_projection_heads.<teacher id>_<level>.*")
    if int(tid) >= len(teachers) or int(level) >= len(blocks):
        raise SakError(
            f"authors' key {key!r}: teacher id {tid} / level {level} beyond this student's "
            f"{len(teachers)} teachers and {len(blocks)} levels"
        )
    for theirs, ours in _PROJECTOR_LAYERS.items():
        if tail.startswith(theirs):
            return f"projectors.{teachers[int(tid)]}.{blocks[int(level)]}.{ours}{tail[len(theirs) :]}"
    raise SakError(f"authors' key {key!r}: a projector has only net.0 and net.2")


def _teacher_rows(model: PrismStudent, teacher_order: Sequence[str] | None) -> list[str]:
    order = list(model.teacher_names if teacher_order is None else teacher_order)
    if sorted(order) != sorted(model.teacher_names):
        raise SakError(
            f"teacher_order {order} must name each of this student's teachers {model.teacher_names} once"
        )
    return order


def _task_rows(model: PrismStudent, authors_tasks: Sequence[str]) -> list[int]:
    """For each of our tasks, the row of the authors' task embedding (their task order)."""
    missing = [t for t in model.task_names if t not in authors_tasks]
    if missing:
        raise SakError(f"tasks {missing} are not among the checkpoint's tasks {list(authors_tasks)}")
    return [list(authors_tasks).index(t) for t in model.task_names]


def convert_authors_stage1(
    state_dict: Mapping[str, torch.Tensor],
    model: PrismStudent,
    teacher_order: Sequence[str] | None = None,
    authors_tasks: Sequence[str] = (),
    resample_pos_embed: bool = False,
) -> dict[str, torch.Tensor]:
    """Their `Condition_MoE_PRISM` state_dict -> `model.state_dict()` keys, checked key by key.

    teacher_order: our teacher name for each of their teacher ids (default: the model's order).
    authors_tasks: their task order when the checkpoint carries task embeddings (stage 2); a stage-1
    checkpoint has none and a model with tasks keeps its fresh task embeddings, as the authors do.
    resample_pos_embed: bicubically resample a position embedding of another grid (stage 1 at 384 into
    a stage-2 model at 512), as their stage-2 loader does; otherwise a size mismatch is an error.
    """
    teachers = _teacher_rows(model, teacher_order)
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        if key in AUTHORS_UNUSED_KEYS or key.endswith(AUTHORS_UNUSED_SUFFIXES):
            continue
        head, _, rest = key.partition(".")
        if head == "backbone":
            new = _rename_backbone(rest)
        elif head == "vfm_projection_heads":
            new = _projector_key(key, rest, teachers, model.levels)
        elif key == "vfm_condition_embeddings.weight":
            if value.shape[0] != len(teachers):
                raise SakError(
                    f"the checkpoint has {value.shape[0]} teacher embeddings, the student {len(teachers)}"
                )
            rows = [teachers.index(name) for name in model.teacher_names]
            new, value = "teacher_embeddings.weight", value[rows]
        elif key == "task_condition_embeddings.weight":
            if value.shape[0] == 0 or not model.task_names:
                continue  # stage 1 (no tasks), or a stage-2 checkpoint read as a stage-1 student
            if value.shape[0] != len(authors_tasks):
                raise SakError(
                    f"the checkpoint has {value.shape[0]} task embeddings; pass authors_tasks, their task "
                    f"order (e.g. {AUTHORS_TASK_ORDER['pascal_context']})"
                )
            new, value = "task_embeddings.weight", value[_task_rows(model, authors_tasks)]
        else:
            raise SakError(
                f"authors' key {key!r} is not part of the PRISM student layout "
                "(backbone, vfm_projection_heads, vfm/task_condition_embeddings)"
            )
        if new in out:
            raise SakError(f"authors' keys {source[new]!r} and {key!r} both map to {new!r}")
        if new == "stem.pos_embed" and new in ours and value.shape != ours[new].shape and resample_pos_embed:
            value = resample_abs_pos_embed(
                value,
                new_size=list(model.stem.patch_embed.grid_size),
                num_prefix_tokens=model.num_prefix_tokens,
            )
        out[new] = value
        source[new] = key
    if model.task_embeddings is not None and "task_embeddings.weight" not in out:
        out["task_embeddings.weight"] = ours["task_embeddings.weight"]  # fresh, as their stage-2 loader
    check_state_dict(out, {k: v.shape for k, v in ours.items()}, "the converted authors' checkpoint")
    return out


@dataclass(frozen=True)
class AuthorsStage2:
    """A converted stage-2 checkpoint: the student's weights and the decode heads' (`heads.<task>.*`,
    our DecodeHead layout of student/model/multitask.py, which is theirs)."""

    student: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]


def convert_authors_stage2(
    state_dict: Mapping[str, torch.Tensor],
    model: PrismStudent,
    authors_tasks: Sequence[str],
    teacher_order: Sequence[str] | None = None,
    single_logit_saliency: bool = True,
) -> AuthorsStage2:
    """Their `MultiTaskModel` state_dict -> (student weights, head weights of our tasks).

    authors_tasks: their task order (AUTHORS_TASK_ORDER[dataset]). Their saliency head predicts two
    classes (cross-entropy); with single_logit_saliency its last conv becomes the one logit z1 - z0
    (softmax(z)[1] = sigmoid(z1 - z0)), as the SAK stage-2 converter does.
    """
    backbone: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("heads."):
            task = key.split(".", 2)[1]
            if task not in model.task_names:
                continue  # a head this model does not predict
            if single_logit_saliency and key.startswith("heads.sal.last_conv.") and value.shape[0] == 2:
                value = (value[1] - value[0]).unsqueeze(0)
            heads[key] = value
        elif key.startswith("backbone."):
            backbone[key.removeprefix("backbone.")] = value
        else:
            raise SakError(f"authors' stage-2 key {key!r} is neither under backbone. nor heads.")
    missing = sorted({t for t in model.task_names} - {k.split(".", 2)[1] for k in heads})
    if missing:
        raise SakError(f"the stage-2 checkpoint has no decode head for tasks {missing}")
    student = convert_authors_stage1(backbone, model, teacher_order, authors_tasks)
    return AuthorsStage2(student, heads)


def read_authors_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A released .pth ({"model": ...}, weights_only) or safetensors file as a flat state_dict."""
    return read_paper_checkpoint(path)


def load_authors_stage1(
    model: PrismStudent,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    teacher_order: Sequence[str] | None = None,
    resample_pos_embed: bool = False,
) -> None:
    """Convert their stage-1 checkpoint (file or state_dict) and load it into `model`, strictly."""
    sd = source if isinstance(source, Mapping) else read_authors_checkpoint(source)
    if any(k.startswith("heads.") or k.startswith("backbone.backbone.") for k in sd):
        raise SakError(
            "this is a stage-2 checkpoint (heads. / backbone.backbone. keys); use load_authors_stage2"
        )
    model.load_state_dict(
        convert_authors_stage1(sd, model, teacher_order, (), resample_pos_embed), strict=True
    )


def load_authors_stage2(
    model: PrismStudent,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    authors_tasks: Sequence[str],
    teacher_order: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the student part of their stage-2 checkpoint into `model`; returns the heads' weights."""
    sd = source if isinstance(source, Mapping) else read_authors_checkpoint(source)
    converted = convert_authors_stage2(sd, model, authors_tasks, teacher_order)
    model.load_state_dict(converted.student, strict=True)
    return converted.heads
