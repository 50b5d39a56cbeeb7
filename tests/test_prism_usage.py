"""Expert-use statistics and their picture (student/model/prism_usage.py) on a hand-set gate pattern."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sak.pipeline.base.errors import SakError
from sak.student.model.prism import PrismFeatures, TeacherTarget, build_prism
from sak.student.model.prism_moe import BlockRouting
from sak.student.model.prism_pairs import RoutePairs
from sak.student.model.prism_usage import count_expert_use, plot_expert_use

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("a", "b", "semseg", "depth")  # condition indices 0..3; "depth" gets no rows


def routing(block: int, semseg_like_a: bool) -> BlockRouting:
    """Rows: a (image 0), a (image 1), b (image 0), semseg (image 0); two tokens each; 4 experts, top 2.
    a: every token picks (0, 1) with (0.75, 0.25), g 0.9.
    b: token 1 picks (2, 3) with (0.5, 0.5), token 2 (2, 0) with (0.6, 0.4); g 0.6 and 0.8.
    semseg: both tokens (3, 1) with (0.9, 0.1), g 0.5 (or a's pattern when semseg_like_a)."""
    a_idx, a_w = [[0, 1], [0, 1]], [[0.75, 0.25], [0.75, 0.25]]
    s_idx, s_w = ([[3, 1], [3, 1]], [[0.9, 0.1], [0.9, 0.1]]) if not semseg_like_a else (a_idx, a_w)
    index = torch.tensor([a_idx, a_idx, [[2, 3], [2, 0]], s_idx])
    weight = torch.tensor([a_w, a_w, [[0.5, 0.5], [0.6, 0.4]], s_w])
    gate = torch.tensor([[0.9, 0.9], [0.9, 0.9], [0.6, 0.8], [0.5, 0.5]]).unsqueeze(-1)
    return BlockRouting(block, torch.zeros(4, 2, 4), index, weight, gate)


def features() -> PrismFeatures:
    pairs = RoutePairs(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 2]), 2)
    return PrismFeatures([1, 3], pairs, [torch.zeros(4, 8, 1, 2)] * 2, [routing(1, False), routing(3, True)])


A_LOAD, B_LOAD, S_LOAD = [0.5, 0.5, 0, 0], [0.25, 0, 0.5, 0.25], [0, 0.5, 0, 0.5]


def test_shares_on_a_hand_set_pattern():
    use = count_expert_use(features(), NAMES).summary()
    assert use.blocks == (1, 3) and use.conditions == NAMES and use.num_experts == 4
    assert use.tokens == (4, 2, 2, 0)
    np.testing.assert_allclose(use.load[0], [A_LOAD, B_LOAD, S_LOAD, [0, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(use.load[1], [A_LOAD, B_LOAD, A_LOAD, [0, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(use.weight[0][0], [0.75, 0.25, 0, 0], atol=1e-7)
    np.testing.assert_allclose(use.weight[0][1], [0.2, 0, 0.55, 0.25], atol=1e-7)
    np.testing.assert_allclose(use.weight[0][2], [0, 0.1, 0, 0.9], atol=1e-7)
    np.testing.assert_allclose(use.dense[0], [0.9, 0.7, 0.5, 0.0], atol=1e-7)
    # total variation between conditions' loads: block 1 (0.75 + 0.5 + 0.75) / 3, block 3 (0.75 + 0 + 0.75) / 3
    np.testing.assert_allclose(use.specialisation(), [2 / 3, 0.5], atol=1e-7)
    record = json.loads(json.dumps(use.to_dict()))  # what metrics.jsonl gets
    assert record["tokens"] == [4, 2, 2, 0] and record["specialisation"] == pytest.approx([2 / 3, 0.5])


def test_counts_accumulate_over_steps():
    one = count_expert_use(features(), NAMES)
    two = (one + one).summary()
    assert two.tokens == (8, 4, 4, 0)
    assert two.load == one.summary().load
    with pytest.raises(SakError, match="different blocks or conditions"):
        one + count_expert_use(features(), ("x", "y", "z", "w"))


def test_picture_is_written_with_the_shares(tmp_path):
    path = tmp_path / "experts.png"
    drawn = plot_expert_use(count_expert_use(features(), NAMES).summary(), path)
    np.testing.assert_allclose(drawn[0], [A_LOAD, B_LOAD, S_LOAD], atol=1e-7)  # depth (no tokens) left out
    np.testing.assert_allclose(drawn[1], [A_LOAD, B_LOAD, A_LOAD], atol=1e-7)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 100


def test_counts_of_a_real_forward_add_up():
    teachers = (TeacherTarget("t0", 16), TeacherTarget("t1", 16))
    model = build_prism("prism_tiny", teachers, tasks=("semseg",), img_size=32).eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 32, 32)
        feats = model.forward_features(x, model.teacher_pairs(3).cat(model.task_pairs(3)))
    use = count_expert_use(feats, model.condition_names).summary()
    tokens = 3 * (2 * 2 + 1)  # images x (patches + CLS)
    assert use.tokens == (tokens,) * 3
    for b in range(4):
        for c in range(3):
            assert sum(use.load[b][c]) == pytest.approx(1.0)
            assert sum(use.weight[b][c]) == pytest.approx(1.0, rel=1e-5)
            assert 0.5 <= use.dense[b][c] <= 1.0
