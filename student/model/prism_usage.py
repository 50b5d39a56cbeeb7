"""Expert use of a PRISM student: which routed experts each teacher (stage 1) and task (stage 2) uses.

    count_expert_use(features, names)   per step, on the device, from the routing the forward already
                                        made: a few bincounts, no host sync
    counts + counts                     accumulate over steps
    counts.summary() -> ExpertUse       one host sync; plain numbers for metrics.jsonl
    plot_expert_use(use, path)          routers.png-style heat maps, one panel per MoE block

Per MoE block b, condition c (teacher or task) and expert e, over the tokens routed under c (all tokens,
CLS included, as the authors' affinity analysis counts them):
    load[b][c][e]    share of c's top-k selections that picked e (sums to 1 over e)
    weight[b][c][e]  mean dispatch weight of e per token (sums to 1 over e: the top-k weights do)
    dense[b][c]      mean stream gate g: the dense FFN's share of the block's FFN output
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismFeatures


@dataclass
class ExpertUseCounts:
    """Device-side sums: selections (L, K, E), weight (L, K, E), dense (L, K), tokens (K,)."""

    blocks: tuple[int, ...]
    conditions: tuple[str, ...]
    selections: torch.Tensor
    weight: torch.Tensor
    dense: torch.Tensor
    tokens: torch.Tensor

    def __add__(self, other: ExpertUseCounts) -> ExpertUseCounts:
        if (self.blocks, self.conditions) != (other.blocks, other.conditions):
            raise SakError("cannot add expert-use counts of different blocks or conditions")
        return ExpertUseCounts(
            self.blocks,
            self.conditions,
            self.selections + other.selections,
            self.weight + other.weight,
            self.dense + other.dense,
            self.tokens + other.tokens,
        )

    def summary(self) -> ExpertUse:
        """Shares and means as plain floats (one host-device sync). A condition with no tokens reads 0."""
        selections = self.selections.double().cpu()
        tokens = self.tokens.double().cpu()
        per_token = tokens.clamp_min(1.0)
        load = selections / selections.sum(-1, keepdim=True).clamp_min(1.0)  # (L, K, E)
        weight = self.weight.double().cpu() / per_token[None, :, None]
        dense = self.dense.double().cpu() / per_token[None, :]
        return ExpertUse(
            blocks=self.blocks,
            conditions=self.conditions,
            num_experts=int(self.selections.shape[-1]),
            tokens=tuple(int(t) for t in tokens.tolist()),
            load=_nested(load),
            weight=_nested(weight),
            dense=tuple(tuple(float(v) for v in row) for row in dense.tolist()),
        )


def _nested(x: torch.Tensor) -> tuple[tuple[tuple[float, ...], ...], ...]:
    return tuple(tuple(tuple(float(v) for v in row) for row in block) for block in x.tolist())


@dataclass(frozen=True)
class ExpertUse:
    """Expert use over some steps: [block][condition][expert] shares (see the module docstring)."""

    blocks: tuple[int, ...]
    conditions: tuple[str, ...]
    num_experts: int
    tokens: tuple[int, ...]
    load: tuple[tuple[tuple[float, ...], ...], ...]
    weight: tuple[tuple[tuple[float, ...], ...], ...]
    dense: tuple[tuple[float, ...], ...]

    def specialisation(self) -> tuple[float, ...]:
        """Per block: mean over condition pairs (with tokens) of the total-variation distance between
        their load vectors; 0 = every condition uses the experts alike, 1 = disjoint experts."""
        present = [k for k, n in enumerate(self.tokens) if n > 0]
        out = []
        for block in self.load:
            pairs = list(combinations(present, 2))
            if not pairs:
                out.append(0.0)
                continue
            tv = [0.5 * float(np.abs(np.subtract(block[a], block[b])).sum()) for a, b in pairs]
            out.append(float(np.mean(tv)))
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (metrics.jsonl): the fields plus the per-block specialisation."""
        return {**asdict(self), "specialisation": list(self.specialisation())}


def count_expert_use(features: PrismFeatures, condition_names: Sequence[str]) -> ExpertUseCounts:
    """Counts of one forward's routing, by the condition of each row. No gradient, no host sync."""
    K = len(condition_names)
    if not features.routing:
        raise SakError("this forward has no routed blocks to count")
    E = features.routing[0].num_experts
    selections, weights, dense = [], [], []
    with torch.no_grad():
        device = features.routing[0].logits.device
        condition = features.pairs.condition.to(device)  # (P,)
        tokens_per_row = features.routing[0].logits.shape[1]
        token_condition = condition.repeat_interleave(tokens_per_row)  # (P*T,)
        for r in features.routing:
            k = r.top_index.shape[-1]
            flat_index = r.top_index.reshape(-1, k)  # (P*T, k)
            flat_weight = r.top_weight.reshape(-1, k).float()
            slot = (token_condition[:, None] * E + flat_index).reshape(-1)  # condition-major expert id
            chosen = (flat_weight > 0).reshape(-1).float()
            selections.append(torch.bincount(slot, chosen, minlength=K * E).reshape(K, E))
            weights.append(torch.bincount(slot, flat_weight.reshape(-1), minlength=K * E).reshape(K, E))
            dense.append(torch.bincount(token_condition, r.stream_gate.reshape(-1).float(), minlength=K))
        tokens = torch.bincount(token_condition, minlength=K).float()
    return ExpertUseCounts(
        tuple(r.block for r in features.routing),
        tuple(condition_names),
        torch.stack(selections),
        torch.stack(weights),
        torch.stack(dense),
        tokens,
    )


def plot_expert_use(use: ExpertUse, path: str | Path, title: str = "expert use") -> list[np.ndarray]:
    """One heat map per MoE block: rows = teachers / tasks (with their dense share g), columns = routed
    experts, colour and number = load share. Writes the PNG; returns the (K, E) matrices drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k, n in enumerate(use.tokens) if n > 0]
    if not present:
        raise SakError("no routed tokens to draw")
    matrices = [np.asarray(block, dtype=np.float64)[present] for block in use.load]
    rows = [f"{use.conditions[k]} (g {np.mean([d[k] for d in use.dense]):.2f})" for k in present]
    E = use.num_experts
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(0.45 * E * len(matrices) + 2.5, 0.5 * len(present) + 1.6), squeeze=False
    )
    vmax = max(float(m.max()) for m in matrices) or 1.0
    image = None
    for ax, block, m, spec in zip(axes[0], use.blocks, matrices, use.specialisation()):
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                f"{100 * v:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if v < vmax / 2 else "k",
            )
        ax.set_title(f"block {block} (spec. {spec:.2f})", fontsize=8)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.set_xlabel("routed expert", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label="share of top-k selections")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return matrices
