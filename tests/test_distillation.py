"""Fine-tuning that also learns from the dense baseline's outputs (``train.distill_weight``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness import runner
from harness.training import DistillationLoss, fit

from .conftest import FAST, compose_config, run_cli


def _logits(seed: int, shape: tuple[int, int] = (16, 10)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _Fixed(nn.Module):
    """A 'teacher' that returns given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_the_loss_mixes_cross_entropy_and_the_teachers_softened_outputs():
    student, teacher, targets = _logits(0), _logits(1), torch.randint(0, 10, (16,))
    inputs = torch.zeros(16, 1)
    ce = nn.functional.cross_entropy(student, targets)
    # weight 0: the labels only; a teacher that agrees with the student adds nothing
    assert torch.allclose(DistillationLoss(_Fixed(teacher), 0.0, 4.0)(student, targets, inputs), ce)
    agreeing = DistillationLoss(_Fixed(student.clone()), 0.5, 4.0)(student, targets, inputs)
    assert torch.allclose(agreeing, 0.5 * ce, atol=1e-6)
    # weight 1: T^2 * KL(teacher || student) at temperature T, by its definition
    t = 3.0
    p = torch.softmax(teacher / t, dim=1)
    kl = (p * (torch.log(p) - torch.log_softmax(student / t, dim=1))).sum(dim=1).mean() * t * t
    assert torch.allclose(DistillationLoss(_Fixed(teacher), 1.0, t)(student, targets, inputs), kl, atol=1e-5)


def test_fit_pulls_the_student_towards_the_teacher_and_never_trains_the_teacher():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.randint(0, 4, (256,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    teacher = nn.Linear(8, 4)
    before = copy.deepcopy(teacher.state_dict())
    cfg = compose_config(["train.distill_weight=1.0", "train.distill_temperature=1", "train.weight_decay=0"]).train
    student = nn.Linear(8, 4)

    def gap(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.kl_div(torch.log_softmax(model(x), 1), torch.log_softmax(teacher(x), 1),
                                              reduction="batchmean", log_target=True))

    start = gap(student)
    fit(student, loader, loader, cfg, epochs=5, lr=0.1, device=torch.device("cpu"), teacher=teacher)
    assert gap(student) < start / 4  # labels play no part at weight 1: the student learned the teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_a_pruned_run_distills_from_its_own_cached_dense_baseline(tmp_path):
    plain = compose_config([*FAST, "prune.target_sparsity=0.9", "tracking=none", f"outputs_dir={tmp_path}"])
    distilled = compose_config([*FAST, "prune.target_sparsity=0.9", "tracking=none", f"outputs_dir={tmp_path}",
                                "train.distill_weight=0.9"])
    a = runner.run(plain, tmp_path / "plain").metrics
    b = runner.run(distilled, tmp_path / "distilled").metrics
    # the same dense baseline (one cache entry), the same sparsity, a different fine-tuning
    assert len(list((tmp_path / "baselines").iterdir())) == 1
    assert a["baseline/accuracy"] == b["baseline/accuracy"]
    assert a["final/sparsity"] == pytest.approx(b["final/sparsity"], abs=1e-4) == pytest.approx(0.9, abs=0.005)
    pa = torch.load(tmp_path / "plain" / "pruned_model.pt", weights_only=False)
    pb = torch.load(tmp_path / "distilled" / "pruned_model.pt", weights_only=False)
    sa, sb = (m if isinstance(m, dict) else m.state_dict() for m in (pa, pb))
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("override", "message"), [
    ("train.distill_weight=1.5", "train.distill_weight=1.5: must be in [0, 1]"),
    ("train.distill_temperature=0", "train.distill_temperature=0.0: must be > 0"),
])
def test_bad_distillation_settings_are_one_line_errors(tmp_path, override, message):
    result = run_cli([override], tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
