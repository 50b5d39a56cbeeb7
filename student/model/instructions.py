"""Task instructions for TIGER: one sentence per task, encoded ONCE by a frozen CLIP text tower (open_clip).

The embeddings (T, text_dim), L2-normalised as CLIP's are, and the encoder's identity (model, pretrained
tag or "random init, seed s", sha256 of the texts) are stored in the run (`RUN/instructions.json` +
`RUN/instructions.safetensors`, written and read by student/run/folder.py), so training and evaluation
never hold the text model. Without weights
(no network here) `--text-pretrained none` builds the real architecture with random weights, flagged in
the identity; such embeddings still differ per sentence but carry no language meaning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.config import InstructionIdentity

DEFAULT_INSTRUCTIONS = {
    "semseg": "Segment the image into semantic classes, labelling every pixel with its object or stuff category.",
    "human_parts": "Segment the parts of each person's body, such as head, torso, arms and legs.",
    "sal": "Find the most salient objects that draw the eye and separate them from the background.",
    "normals": "Estimate the orientation of the surface at every pixel as a 3D normal vector.",
    "edge": "Detect the boundaries between objects and regions in the image.",
    "depth": "Estimate the distance from the camera to the scene at every pixel.",
}


def texts_sha256(texts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(texts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def instruction_texts(tasks: list[str], path: str | None) -> dict[str, str]:
    """The defaults, overridden by a JSON file {task: sentence}; every task must have one."""
    texts = dict(DEFAULT_INSTRUCTIONS)
    if path:
        try:
            given = json.loads(Path(path).expanduser().read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SakError(f"--instructions {path}: cannot read it as JSON ({type(e).__name__})") from None
        if not isinstance(given, dict) or not all(isinstance(v, str) and v.strip() for v in given.values()):
            raise SakError(f'--instructions {path}: expected {{"task": "one sentence", ...}}')
        texts.update(given)
    missing = [t for t in tasks if t not in texts]
    if missing:
        raise SakError(
            f"no instruction for task(s) {', '.join(missing)}; add them to --instructions FILE.json"
        )
    return {t: texts[t] for t in tasks}


@torch.no_grad()
def encode_instructions(
    texts: dict[str, str], model_name: str, pretrained: str | None, seed: int = 0
) -> tuple[torch.Tensor, InstructionIdentity]:
    """(T, dim) L2-normalised text embeddings in the order of `texts`, and the encoder's identity."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise SakError(f"--text-model {model_name!r} is not an open_clip model (open_clip.list_models())")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu")
    except Exception as e:  # network, hub or unknown tag
        raise SakError(
            f"could not load open_clip {model_name} weights {pretrained!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}; pass --text-pretrained none for a flagged random-init encoder"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    emb = model.encode_text(tokenizer(list(texts.values())), normalize=True).float()
    identity = InstructionIdentity(
        model=model_name,
        weights=pretrained if pretrained else f"random init, seed {seed}",
        random_init=not pretrained,
        texts_sha256=texts_sha256(texts),
        texts=dict(texts),
        dim=int(emb.shape[1]),
    )
    del model  # the text model is never held during training
    return emb.contiguous(), identity
