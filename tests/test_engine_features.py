"""Engine features: tensor selection, the optimizer-step clock, global scope, dry runs, every
pattern and criterion through the harness's own config."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness import runner
from harness.pruning import Pruning
from harness.pruning.schedules import cosine, exponential, one_shot

from .conftest import FAST, compose_config, run_cli


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 1))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


def names_for(spec: dict) -> list[str]:
    return list(Pruning({"update_frequency": 1, **spec}).attach(TwoBlocks()).params)


def test_names_by_exact_name_glob_and_regex_with_excludes():
    assert names_for({"names": ["head.weight"]}) == ["head.weight"]
    assert names_for({"names": ["layer1.*"]}) == ["layer1.0.weight", "layer1.2.weight"]  # no bias, no norm
    assert names_for({"names": [r"re:layer\d\.0\.weight"]}) == ["layer1.0.weight", "layer2.0.weight"]
    assert names_for({"exclude": ["head.weight", "layer2.*"]}) == ["layer1.0.weight", "layer1.2.weight"]
    assert names_for({"names": ["layer1.1.bias"]}) == ["layer1.1.bias"]  # an exact name may be anything


@pytest.mark.parametrize(("spec", "message"), [
    ({"names": ["layer3.*"]}, "names: 'layer3.*' matches no parameter"),
    ({"exclude": ["haed.weight"]}, "exclude: 'haed.weight' matches no parameter of the model; closest: head.weight"),
    ({"names": ["head.weight"], "exclude": ["head.*"]}, "no tensor left to prune"),
    ({"pattern": "nm", "n": 2, "m": 8, "names": ["layer1.0.weight"], "target_sparsity": 0.5},
     "layer1.0.weight (8, 4, 3, 3) has 4 input channels, not a multiple of m=8"),
])
def test_selection_errors_name_the_key_and_the_closest_names(spec, message):
    with pytest.raises(ValueError) as err:
        names_for(spec)
    assert message in str(err.value)


def test_default_selection_skips_and_reports_what_the_pattern_cannot_take():
    nm = Pruning({"pattern": "nm", "n": 2, "m": 8, "target_sparsity": 0.75, "update_frequency": 1}).attach(
        TwoBlocks())
    assert nm.skipped == {"layer1.0.weight": "(8, 4, 3, 3) has 4 input channels, not a multiple of m=8"}
    assert set(nm.params) == {"layer1.2.weight", "layer2.0.weight", "layer2.1.weight", "head.weight"}
    channel = Pruning({"pattern": "channel", "update_frequency": 1}).attach(TwoBlocks())
    assert "remove classes" in channel.skipped["head.weight"]


def run_steps(pruning, model, optimizer, epochs, batches, accumulate=1, explicit=True, scaler=None):
    for epoch in range(epochs):
        pruning.on_epoch_begin(epoch)
        for i in range(batches):
            pruning.on_batch_begin(i)
            loss = model(torch.randn(2, 4, 6, 6)).pow(2).mean() / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accumulate == 0:
                if explicit:
                    pruning.on_before_optimizer_step()
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
            pruning.on_batch_end()


def test_clock_counts_optimizer_steps_under_gradient_accumulation():
    model = TwoBlocks()
    pruning = Pruning({"target_sparsity": 0.6, "end_epoch": 1, "update_frequency_steps": 2,
                       "schedule": "linear"}).attach(model, steps_per_epoch=4)
    seen = []
    pruning.add_listener(lambda u: seen.append((u.epoch, u.step, round(u.target, 4))))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run_steps(pruning, model, optimizer, epochs=2, batches=8, accumulate=2)
    assert pruning.global_step == 8  # 16 batches, 8 optimizer steps
    # every 2 optimizer steps over a window of 4 steps: positions 0, 2, 4 (the end)
    assert seen == [(0, 0, 0.0), (0, 2, 0.3), (1, 0, 0.6)]


def test_optimizer_hooks_count_only_the_steps_a_grad_scaler_takes():
    model = TwoBlocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruning = Pruning({"target_sparsity": 0.5, "end_epoch": 0, "update_frequency": 1}).attach(
        model, optimizer=optimizer)
    scaler = torch.amp.GradScaler("cpu")
    pruning.on_epoch_begin(0)
    for i in range(6):
        pruning.on_batch_begin(i)
        loss = model(torch.randn(2, 4, 6, 6)).pow(2).mean()
        if i in (1, 4):
            loss = loss * float("inf")  # an overflow: the scaler skips this step
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for name, param in pruning.params.items():  # no on_batch_end needed: the post-step hook masks
            assert torch.all(param[pruning.masks[name] == 0] == 0)
    assert pruning.global_step == 4
    pruning.finalize()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_global_scope_ranks_across_tensors_and_respects_the_cap():
    model = TwoBlocks()
    with torch.no_grad():
        model.head.weight.mul_(0.001)  # tiny weights: global ranking wants all of them
    pruning = Pruning({"scope": "global", "target_sparsity": 0.5, "max_sparsity": 0.8, "end_epoch": 0,
                       "update_frequency": 1}).attach(model)
    pruning.on_epoch_begin(0)
    rows = {r.name: r for r in pruning.sparsity()}
    assert rows["head.weight"].sparsity == pytest.approx(0.8, abs=1 / 48)
    assert all(r.sparsity <= 0.8 + 1e-9 for r in rows.values())
    total = sum(r.numel for r in rows.values())
    assert sum(r.zeros for r in rows.values()) == round(0.5 * total)


def test_dry_run_plans_every_update_without_touching_weights():
    model = TwoBlocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = Pruning({"target_sparsity": 0.8, "end_epoch": 2, "update_frequency": 0.5,
                       "schedule": "linear"}).attach(model, steps_per_epoch=4)
    plan = pruning.plan(epochs=4)
    assert [(u.epoch, u.step) for u in plan] == [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0)]
    assert [round(u.sparsity["head.weight"], 4) for u in plan] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exponential_cosine_and_one_shot_schedules():
    assert exponential(0.0, 0.9, 1, 1.0, 2.0) == pytest.approx(1 - 0.1**0.5)  # density shrinks geometrically
    assert exponential(0.2, 0.9, 2, 1.0, 2.0) == pytest.approx(0.9)
    assert cosine(0.0, 0.8, 1, 1.0, 2.0) == pytest.approx(0.4)
    assert cosine(0.0, 0.8, 1, 1.0, 4.0) == pytest.approx(0.8 * (1 - math.cos(math.pi / 4)) / 2)
    assert one_shot(0.0, 0.7, 0, 1.0, 5.0) == 0.7


def test_attention_model_in_a_users_own_loop():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(embed_dim=16, num_heads=2, batch_first=True)
    head = nn.Linear(16, 2)
    model = nn.ModuleDict({"attention": attention, "head": head})
    pruning = Pruning({"names": ["attention.in_proj_weight", "attention.out_proj.weight", "head.weight"],
                       "target_sparsity": 0.75, "end_epoch": 2, "update_frequency": 1}).attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for epoch in range(3):
        pruning.on_epoch_begin(epoch)
        for step in range(5):
            pruning.on_batch_begin(step)
            x = torch.randn(4, 6, 16)
            out, _ = attention(x, x, x)
            loss = nn.functional.cross_entropy(head(out.mean(dim=1)), torch.randint(0, 2, (4,)))
            optimizer.zero_grad()
            loss.backward()
            pruning.on_before_optimizer_step()
            optimizer.step()
            pruning.on_batch_end()
    assert [round(r.sparsity, 3) for r in pruning.sparsity()] == [0.75, 0.75, 0.75]


# Every pattern, criterion and schedule is selectable from the command line's config.
@pytest.mark.parametrize(("overrides", "target", "tolerance"), [
    (["prune=nm"], 0.5, 1e-9),
    (["prune=nm", "prune.n=1", "prune.m=4"], 0.75, 1e-9),
    (["prune=block", "prune.block_shape=[4,1]"], 0.8, 0.01),
    (["prune=channel"], 0.5, 0.02),
    (["prune.criterion=taylor", "prune.scope=global"], 0.8, 1e-4),
    (["prune.criterion=snip_momentum"], 0.8, 0.005),
    (["prune.criterion=random", "prune.schedule=cosine"], 0.8, 0.005),
    (["prune.schedule=exponential", "prune.update_frequency_steps=7"], 0.8, 0.005),
    (["prune.schedule=one_shot"], 0.8, 0.005),
])
def test_patterns_criteria_and_schedules_from_config(tmp_path, overrides, target, tolerance):
    cfg = compose_config([*FAST, *overrides, "tracking=none", f"outputs_dir={tmp_path}"])
    result = runner.run(cfg, tmp_path / "run")
    assert result.metrics["final/sparsity"] == pytest.approx(target, abs=tolerance)
    state = torch.load(tmp_path / "run" / "pruned_model.pt", weights_only=True)
    if cfg.prune.pattern.value == "nm":
        groups = state["classifier.1.weight"].reshape(-1, cfg.prune.m)
        assert int((groups != 0).sum(dim=1).max()) <= cfg.prune.n
    if cfg.prune.pattern.value == "channel":
        rows = state["features.2.weight"].flatten(1)
        assert torch.all((rows == 0).all(dim=1) | (rows != 0).any(dim=1))
        assert int((rows == 0).all(dim=1).sum()) == 32  # whole filters removed


@pytest.mark.slow
def test_dry_run_from_the_command_line_writes_nothing(tmp_path):
    result = run_cli(["prune=nm", "prune.dry_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry run: nothing trained" in result.stdout
    assert "not pruned: features.0.weight" in result.stdout
    assert "11 updates" in result.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "baselines").exists()


def test_config_from_dict_yaml_text_omegaconf_dataclass_or_lpot_document(tmp_path):
    import yaml
    from omegaconf import OmegaConf

    from harness.lpot import read_lpot
    from harness.pruning import PruningSpec

    (tmp_path / "plain.yaml").write_text("target_sparsity: 0.6\nschedule: linear\n")
    (tmp_path / "lpot.yaml").write_text(
        "pruning:\n  approach:\n    weight_compression:\n      pruners:\n"
        "        - !Pruner\n            names: ['head.weight']\n            target_sparsity: 0.7\n")
    sources = {
        "dict": {"target_sparsity": 0.6, "schedule": "linear"},
        "yaml": yaml.safe_load((tmp_path / "plain.yaml").read_text()),
        "omegaconf": OmegaConf.create({"target_sparsity": 0.6, "schedule": "linear"}),
        "dataclass": PruningSpec(target_sparsity=0.6, schedule="linear"),
    }
    for name, source in sources.items():
        (spec,) = Pruning(source).pruner_specs
        assert (spec.target_sparsity, spec.schedule.value) == (0.6, "linear"), name
    (lpot,) = Pruning(read_lpot(tmp_path / "lpot.yaml").spec).pruner_specs
    assert (lpot.names, lpot.target_sparsity, lpot.schedule.value) == (["head.weight"], 0.7, "linear")
    # The engine reads no files (an LPOT file goes through harness.lpot): a path is refused with the way on.
    with pytest.raises(TypeError, match=r"harness\.lpot"):
        Pruning(str(tmp_path / "plain.yaml"))
