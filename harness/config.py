"""Structured configs: the schema of every config group, registered in Hydra's ConfigStore.

Hydra merges the YAML files under ``conf/`` into these dataclasses, so an unknown key or a
value of the wrong type fails while composing, before any data is loaded. Range checks
and cross-field checks live in ``__post_init__`` and run once, when
:func:`to_config` turns the composed config into objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.errors import ConfigError, unknown_key_message
from harness.pruning.spec import PruningSpec

DATASETS = ("digits", "cifar10", "imagefolder", "fake")
SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
# conf/ sits beside the package in the checkout (an editable install runs from there).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
HARNESS_MODELS = ("digits_cnn", "mlp")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value}: {allowed}")


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str | None = None  # cifar10 and imagefolder: the folder holding the data
    download: bool = False  # cifar10 only; runs are offline by default
    val_fraction: float = 0.15  # carved from train, stratified and seeded, where the harness splits
    test_fraction: float = 0.15  # digits; imagefolder without a test/ folder
    image_size: int = 32  # imagefolder: images are resized and center-cropped to this
    augment: bool = False  # random crops and flips on the training split of image datasets
    num_workers: int = 0
    train_size: int = 512  # fake only
    eval_size: int = 128  # fake only: size of val and of test
    num_classes: int = 10  # fake only

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            _fail("dataset.name", self.name, f"must be one of {', '.join(DATASETS)}")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                _fail(f"dataset.{key}", value, "must be in (0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            _fail("dataset.test_fraction", self.test_fraction, "val_fraction + test_fraction must be < 1")
        for key in ("image_size", "train_size", "eval_size"):
            if getattr(self, key) < 1:
                _fail(f"dataset.{key}", getattr(self, key), "must be >= 1")
        if self.num_classes < 2:
            _fail("dataset.num_classes", self.num_classes, "must be >= 2")
        if self.num_workers < 0:
            _fail("dataset.num_workers", self.num_workers, "must be >= 0")
        if self.name in ("cifar10", "imagefolder") and not self.root:
            _fail("dataset.root", self.root, f"dataset={self.name} needs the folder that holds its data")


@dataclass
class ModelConfig:
    source: str = "harness"  # harness: digits_cnn, mlp; torchvision: any classification model by name
    name: str = "digits_cnn"
    hidden_sizes: list[int] = field(default_factory=lambda: [300, 100])  # mlp only
    checkpoint: str | None = None  # a local state_dict to start from

    def __post_init__(self) -> None:
        if self.source not in ("harness", "torchvision"):
            _fail("model.source", self.source, "must be one of harness, torchvision")
        if self.source == "harness" and self.name not in HARNESS_MODELS:
            _fail("model.name", self.name,
                  f"must be one of {', '.join(HARNESS_MODELS)} (or use model=torchvision model.name=...)")
        if any(h < 1 for h in self.hidden_sizes):
            _fail("model.hidden_sizes", list(self.hidden_sizes), "every size must be >= 1")


class Optimizer(StrEnum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class LrSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"
    step = "step"  # x0.1 at 50% and 75% of the epochs


@dataclass
class TrainConfig:
    epochs: int = 10  # dense baseline
    finetune_epochs: int = 8  # pruning fine-tune
    batch_size: int = 64
    eval_batch_size: int = 512
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: LrSchedule = LrSchedule.cosine
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:N
    # The fine-tuning's randomness (data order, initial RNG state); unset: seed + 1. ``seed`` keeps
    # choosing the dense baseline, so other fine-tuning seeds re-run the same baseline.
    finetune_seed: int | None = None
    # At most this many optimizer steps per fine-tuning epoch (LPOT's ``pruning.train.iteration``);
    # unset: every batch of the train split.
    finetune_steps_per_epoch: int | None = None
    # Fine-tuning learns from the dense baseline's outputs too (knowledge distillation): the share of
    # the loss given to the teacher (0: labels only) and the temperature that softens both outputs.
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def finetune_seed_for(self, seed: int) -> int:
        return self.finetune_seed if self.finetune_seed is not None else seed + 1

    def __post_init__(self) -> None:
        for key in ("epochs", "finetune_epochs"):
            if getattr(self, key) < 0:
                _fail(f"train.{key}", getattr(self, key), "must be >= 0")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                _fail(f"train.{key}", getattr(self, key), "must be >= 1")
        if self.finetune_steps_per_epoch is not None and self.finetune_steps_per_epoch < 1:
            _fail("train.finetune_steps_per_epoch", self.finetune_steps_per_epoch,
                  "must be >= 1 (or null: every batch)")
        for key in ("lr", "finetune_lr"):
            if not getattr(self, key) > 0:
                _fail(f"train.{key}", getattr(self, key), "must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            _fail("train.momentum", self.momentum, "must be in [0, 1)")
        if self.nesterov and (self.optimizer != Optimizer.sgd or self.momentum == 0):
            _fail("train.nesterov", self.nesterov, "needs train.optimizer=sgd with train.momentum > 0")
        if self.weight_decay < 0:
            _fail("train.weight_decay", self.weight_decay, "must be >= 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            _fail("train.distill_weight", self.distill_weight,
                  "must be in [0, 1] (0: labels only, 1: the dense model's outputs only)")
        if not self.distill_temperature > 0:
            _fail("train.distill_temperature", self.distill_temperature, "must be > 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("train.device", self.device, "must be one of auto, cpu, cuda, cuda:N")


class Allocation(StrEnum):
    uniform = "uniform"  # every tensor gets target_sparsity
    sensitivity = "sensitivity"  # per-tensor targets from a sensitivity analysis, same overall sparsity


@dataclass
class PruneConfig(PruningSpec):
    """The engine's :class:`PruningSpec` fields, plus what the harness does with them."""

    enabled: bool = True  # prune=none sets false: the dense baseline is evaluated and reported
    dry_run: bool = False  # list the matched tensors and the planned sparsity of every update, then stop
    allocation: Allocation = Allocation.uniform
    allocation_strength: float = 1.0  # sensitivity allocation: 0 = uniform ... 1 = fully sensitivity-driven

    def __post_init__(self) -> None:
        try:
            self.resolve()
        except ValueError as err:
            raise ConfigError(f"prune.{err}") from None
        if not 0.0 <= self.allocation_strength <= 1.0:
            _fail("prune.allocation_strength", self.allocation_strength, "must be in [0, 1]")
        if self.allocation == Allocation.sensitivity and (self.pruners or self.scope.value == "global"):
            _fail("prune.allocation", "sensitivity", "gives each tensor its own pruner: use it without "
                  "prune.pruners and with prune.scope=per_tensor")


class AnalyzeMode(StrEnum):
    none = "none"
    sensitivity = "sensitivity"  # prune each tensor alone at each sparsity (one-shot) and measure val accuracy


@dataclass
class AnalyzeConfig:
    mode: AnalyzeMode = AnalyzeMode.none
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    names: list[str] | None = None  # the tensors to analyse; unset: every conv and linear weight

    def __post_init__(self) -> None:
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            _fail("analyze.sparsities", list(self.sparsities), "a non-empty list of values in [0, 1)")


class TrackingBackend(StrEnum):
    mlflow = "mlflow"
    none = "none"


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.mlflow
    uri: str | None = None  # a tracking server or store; default: MLFLOW_TRACKING_URI, else outputs/mlflow.db
    experiment: str = "pruning"
    run_name: str | None = None
    # The run's model (the pruned one), logged at the end as an MLflow model: artifact `model`, with a
    # signature and an input example. Unset: only when registering, since it costs a few seconds per run
    # (MLflow is imported in the training process then, and the model saved), as much as a digits run.
    log_model: bool | None = None
    # ... and registered under this name in the store's model registry, a new version each run:
    # load it with mlflow.pytorch.load_model("models:/<name>/<version>").
    register_as: str | None = None

    @property
    def logs_model(self) -> bool:
        return self.log_model if self.log_model is not None else self.register_as is not None

    def __post_init__(self) -> None:
        if self.register_as is not None and self.log_model is False:
            _fail("tracking.register_as", self.register_as, "needs tracking.log_model=true (or unset)")
        if self.register_as is not None and not self.register_as.strip():
            _fail("tracking.register_as", self.register_as, "must be a non-empty name")


@dataclass
class DeployConfig:
    """What a pruned run measures at its end (harness.export.deployment_report): non-zero MACs and the
    compressed checkpoint always (cheap), the latency of the exported model against the dense one
    when ``measure``, timed side by side for at most ``time_limit_s``."""

    measure: bool = True  # false: no latency timing (and no export); MACs and the checkpoint still written
    # The latency timing's budget, warm-up included: rounds stop when the next would not fit (one
    # round is always timed). 10 s is a few percent of a run that trains a real model (resnet18 at
    # 224x224: ~9 min) and a dozen rounds or more for a small one; medians over fewer rounds are noisier.
    time_limit_s: float = 10.0
    batch_size: int = 64  # the first images of the test split: the batch timed and MACs counted on

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            _fail("deploy.time_limit_s", self.time_limit_s, "must be > 0")
        if self.batch_size < 1:
            _fail("deploy.batch_size", self.batch_size, "must be >= 1")


class GoalCriterion(StrEnum):
    relative = "relative"  # (dense - pruned) / dense <= max_drop, LPOT's accuracy_criterion: relative
    absolute = "absolute"  # dense - pruned <= max_drop


@dataclass
class GoalConfig:
    criterion: GoalCriterion = GoalCriterion.relative
    max_drop: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop < 1.0:
            _fail("goal.max_drop", self.max_drop, "must be in [0, 1)")


@dataclass
class SweepTrialConfig:
    """Set by the sweeper for each trial's run: which Optuna trial it evaluates."""

    storage: str | None = None
    study: str | None = None
    number: int = -1
    parent_run_id: str | None = None  # the sweep's MLflow run, to nest this run under it
    confirmation_seed: int | None = None  # set on a confirmation run: the trial re-run with this finetune_seed


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    goal: GoalConfig = field(default_factory=GoalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    seed: int = 0
    outputs_dir: str = "outputs"  # caches and stores; Hydra's run dirs are set in conf/config.yaml
    lpot: str | None = None  # an LPOT / Intel Neural Compressor pruning YAML to run (see harness/lpot_config.py)
    sweep_trial: SweepTrialConfig = field(default_factory=SweepTrialConfig)
    # The metric a sweep optimizes when hydra.sweeper.objectives is not given (lightning-hydra-template's key).
    optimized_metric: str | None = None
    resume: str | None = None  # continue an interrupted run: its run dir, checkpoint file or MLflow run id

    def __post_init__(self) -> None:
        if not self.prune.enabled:
            return
        last = self.train.finetune_epochs - 1
        for i, pruner in enumerate(self.prune.resolve()):
            key = f"prune.pruners[{i}].end_epoch" if self.prune.pruners else "prune.end_epoch"
            if pruner.end_epoch > last:
                _fail(key, pruner.end_epoch,
                      f"must be <= {last}, the last fine-tuning epoch (train.finetune_epochs="
                      f"{self.train.finetune_epochs}; epochs count from 0)")


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can list it first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="harness_schema", node=Config)
    # sweeps/<name>.yaml is the config group `sweep`: python -m harness --multirun +sweep=<name>
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        cs.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")
    # conf/prune/nm.yaml: the target of N:M pruning follows n and m unless set explicitly.
    if not OmegaConf.has_resolver("nm_sparsity"):
        OmegaConf.register_new_resolver("nm_sparsity", lambda n, m: 1.0 - int(n) / int(m))


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The typed config for ``overrides``, composed exactly as the command line does (benchmarks, tests)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def to_config(cfg: DictConfig) -> Config:
    """Turn the composed config into typed objects, running every range check once."""
    _reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def _reject_unknown_keys(node: Any, prefix: str = "") -> None:
    """A key that Hydra let in with ``+`` (``+prune.targt_sparsity=0.9``) but no schema has: an error,
    as for any unknown key, never silently ignored (OmegaConf.to_object would keep it as a stray attribute)."""
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node:
            if fields is not None and key not in fields:
                raise ConfigError(unknown_key_message(f"{prefix}{key}", schema))
            _reject_unknown_keys(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _reject_unknown_keys(node._get_node(i), f"{prefix.removesuffix('.')}[{i}].")


def config_dict(cfg: Config) -> dict[str, Any]:
    """The composed config as plain data (enums as their names), for params, config.yaml and checkpoints."""
    return plain(asdict(cfg))


def plain(value: Any) -> Any:
    """``value`` with every enum replaced by its name, in nested dicts, lists and tuples (as lists)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value.value if isinstance(value, Enum) else value
