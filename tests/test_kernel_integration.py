"""The student trained through the fused kernels (Triton, interpreted on the CPU) follows the torch path."""

import pytest
import torch

from sak.student.model.config import TeacherTarget
from sak.student.model.registry import create_student
from sak.student.train.losses import distillation_loss

STEPS = 30
TOLERANCE = 1e-4  # relative, per step; fp32 throughout, so differences are summation order only


def _train(monkeypatch, backend: str) -> list[float]:
    monkeypatch.setenv("SAK_KERNELS", backend)
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    teachers = (TeacherTarget("dinov2_tiny", 64),)  # one adapter path: 5 fused adapters and 4 loss terms
    model = create_student("tiny", teachers, img_size=32, use_kernels=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    targets = {"dinov2_tiny": [torch.randn(2, 3, 3, 64, generator=gen) for _ in range(4)]}
    losses = []  # per step
    for _ in range(STEPS):
        out = model(images)
        loss, _ = distillation_loss(out.distill_maps, targets, use_kernels=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.filterwarnings("ignore")
def test_triton_path_converges_like_torch(monkeypatch):
    torch_losses = _train(monkeypatch, "torch")
    triton_losses = _train(monkeypatch, "triton")
    assert torch_losses[-1] < torch_losses[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(torch_losses, triton_losses))
    print(
        f"30 steps: loss {torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}; max relative difference {worst:.2e}"
    )
    assert worst <= TOLERANCE
