"""PRISM's stage-1 objective (student/model/prism_loss.py) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from sak.student.model.prism import PrismFeatures, PrismOutput, TeacherTarget, build_prism
from sak.student.model.prism_loss import (
    PrismLossConfig,
    balance_loss,
    balance_term,
    decorrelation_loss,
    distillation_terms,
    prism_stage1_loss,
    stage1_loss_config,
    stage2_balance,
)
from sak.student.model.prism_moe import BlockRouting
from sak.student.model.prism_pairs import RoutePairs

pytestmark = pytest.mark.usefixtures("one_thread")

R2 = 1 / math.sqrt(2)


def square_map() -> torch.Tensor:
    """(1, 2, 2, 2): tokens (row-major) t0 = (1, 0), t1 = (0, 1), t2 = (1, 1), t3 = (1, -1)."""
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    return tokens.T.reshape(1, 2, 2, 2)


def square_map_decorrelation(sigma_fraction: float) -> float:
    """By hand: |cos| is 1/sqrt2 for pairs (0,2), (0,3), (1,2), (1,3) and 0 for (0,1), (2,3); their squared
    distances are 1, 2, 2, 1 on the 2x2 grid; each unordered pair counts twice in the 4x4 mean."""
    sigma = sigma_fraction * 2
    pen = {d2: 1 - math.exp(-d2 / (2 * sigma**2)) for d2 in (1, 2)}
    return 2 * R2 * (pen[1] + pen[2] + pen[2] + pen[1]) / 16


def test_decorrelation_by_hand():
    for frac in (0.5, 0.1):
        assert decorrelation_loss(square_map(), frac).item() == pytest.approx(
            square_map_decorrelation(frac), rel=1e-6
        )
    # a map whose tokens are all orthogonal to one another has nothing to decorrelate
    ortho = torch.eye(4).reshape(1, 4, 2, 2)
    assert decorrelation_loss(ortho).item() == pytest.approx(0.0, abs=1e-7)


def hand_routing(block: int = 2) -> BlockRouting:
    """Two tokens, 3 experts, top 2. Token 1: logits (0, ln2, ln1.5) -> probs (2, 4, 3)/9, picks {1, 2};
    token 2: (ln3, 0, ln2) -> (3, 1, 2)/6, picks {0, 2}. load = (1/2, 1/2, 1), mean prob = (13, 11, 12)/36,
    so balance = 3 * (13/72 + 11/72 + 24/72) = 2."""
    logits = torch.tensor([[[0.0, math.log(2), math.log(1.5)], [math.log(3), 0.0, math.log(2)]]])
    top, index = logits.topk(2, dim=-1)
    return BlockRouting(block, logits, index, top.softmax(-1), torch.full((1, 2, 1), 0.75))


def one_expert_rows(rows: int = 1) -> tuple[torch.Tensor, ...]:
    """Two tokens per row, all probability and all weight on expert 0: balance = 3 * 1 * 1."""
    logits = torch.tensor([[10.0, -30.0, -30.0]]).expand(rows, 2, 3)
    index = torch.tensor([0, 1]).expand(rows, 2, 2)
    weight = torch.tensor([1.0, 0.0]).expand(rows, 2, 2)  # expert 1 chosen with weight 0: not routed
    return logits, index, weight, torch.ones(rows, 2, 1)


def test_balance_by_hand():
    assert balance_term(hand_routing()).item() == pytest.approx(2.0, rel=1e-6)
    assert balance_term(BlockRouting(0, *one_expert_rows())).item() == pytest.approx(3.0, rel=1e-6)
    hr = hand_routing()
    parts = zip((hr.logits, hr.top_index, hr.top_weight, hr.stream_gate), one_expert_rows())
    both = BlockRouting(2, *(torch.cat([a, b]) for a, b in parts))  # row 0 hand case, row 1 one expert
    assert balance_term(both, torch.tensor([0])).item() == pytest.approx(2.0, rel=1e-6)
    assert balance_term(both, torch.tensor([1])).item() == pytest.approx(3.0, rel=1e-6)
    # over both rows (4 tokens): expert 0 routed by 3 of them, 1 by 1, 2 by 2; mean prob pools the rows
    load = torch.tensor([0.75, 0.25, 0.5])
    prob = torch.tensor([(13 / 18 + 2) / 4, (11 / 18) / 4, (12 / 18) / 4])
    assert balance_term(both).item() == pytest.approx(3 * float((load * prob).sum()), rel=1e-5)


def test_stage2_balance_is_teacher_pass_plus_mean_of_task_passes():
    student = build_prism("prism_tiny", (TeacherTarget("a", 8),), tasks=("semseg", "depth"), img_size=32)
    # rows: teacher a (hand case: 2), task semseg (one expert: 3), task depth (hand case: 2)
    hr = hand_routing()
    one = one_expert_rows()
    routing = BlockRouting(
        1,
        *(
            torch.cat([a, b, a])
            for a, b in zip((hr.logits, hr.top_index, hr.top_weight, hr.stream_gate), one)
        ),
    )
    pairs = RoutePairs(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), 1)
    features = PrismFeatures([1], pairs, [torch.zeros(3, 4, 1, 1)], [routing])
    assert stage2_balance(features, student).item() == pytest.approx(2.0 + (3.0 + 2.0) / 2, rel=1e-5)


def test_distillation_terms_pick_each_teachers_rows():
    """Teacher a has rows for images 2 and 0; its targets at those images are 2x the maps (cos 1), the
    target of image 1 is noise. smoothL1 of |d| = 0.5 is 0.5 * 0.25, so the term is 0.1 * 0.125."""
    maps = torch.full((2, 3, 2, 2), 0.5)
    targets = torch.randn(3, 2, 2, 3) * 10
    targets[2] = targets[0] = 1.0
    out = PrismOutput({"a": [maps]}, {"a": torch.tensor([2, 0])}, None)  # type: ignore[arg-type]
    total, terms = distillation_terms(out, {"a": [targets]})
    assert total.item() == pytest.approx(0.1 * 0.125, rel=1e-6)
    assert list(terms) == ["a/L0"]


def test_stage1_total_with_the_configured_coefficients():
    m = square_map()  # (1, 2, 2, 2) for both levels of the first teacher
    routing = hand_routing()
    pairs = RoutePairs(torch.tensor([0]), torch.tensor([0]), 1)
    features = PrismFeatures([2, 5], pairs, [m, m], [routing, routing])
    out = PrismOutput({"a": [m, m]}, {"a": torch.tensor([0])}, features)
    target = (2 * m).permute(0, 2, 3, 1)  # cos 1; |d| = |m| <= 1 -> smoothL1 = mean(0.5 m^2) = 0.5 * 5/8
    l1 = 0.5 * (1 + 1 + 2 + 2) / 8
    config = stage1_loss_config("prism_b")
    terms = prism_stage1_loss(out, {"a": [target, target]}, config)
    decor = 0.5 * 2 * square_map_decorrelation(0.1)
    balance = 0.1 * 0.01 * (2.0 + 2.0)
    assert terms.total.item() == pytest.approx(2 * 0.1 * l1 + decor + balance, rel=1e-5)
    assert terms.decorrelation.item() == pytest.approx(decor, rel=1e-5)
    assert terms.balance.item() == pytest.approx(balance, rel=1e-5)
    no_decor = prism_stage1_loss(out, {"a": [target, target]}, stage1_loss_config("prism_s"))
    assert no_decor.total.item() == pytest.approx(2 * 0.1 * l1 + balance, rel=1e-5)
    assert balance_loss(features).item() == pytest.approx(4.0, rel=1e-6)


def test_stage1_loss_configs_follow_the_authors():
    assert stage1_loss_config("prism_s") == PrismLossConfig(decorrelation=False)  # BS_s1.yml: cos+l1
    for name in ("prism_b", "prism_l", "prism_tiny"):  # BB/LB/LL_s1.yml: cos+l1+decorrelation
        c = stage1_loss_config(name)
        assert c.decorrelation and c.decorrelation_weight == 0.5 and c.decorrelation_levels == (0, 1)
        assert (c.decorrelation_sigma, c.balance_alpha, c.aux_weight) == (0.1, 0.01, 0.1)
