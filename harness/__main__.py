"""Entry point: ``python -m harness [overrides]`` composes the config with Hydra and runs it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.config import CONF_DIR, Config, TrackingBackend, register_configs, to_config
from harness.errors import HarnessError, Interrupted, user_error_message
from harness.lpot_config import apply_lpot_file
from harness.mlflow_writer import writer

if TYPE_CHECKING:
    from harness.sweep.trial import TrialLink

register_configs()



@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, float]:
    if cfg.tracking.backend == TrackingBackend.mlflow:
        writer()  # its process imports MLflow while this one imports torch
    # Imported here, not at the top: config errors surface before torch (seconds) loads.
    from harness import checkpoints, distributed, runner

    try:
        if cfg.lpot:
            cfg = apply_lpot_file(cfg, list(HydraConfig.get().overrides.task))
        config = to_config(cfg)
        output_dir, resume = Path(HydraConfig.get().runtime.output_dir), None
        if config.resume:
            resume = checkpoints.load(config.resume, config)
            config, output_dir = resume.config, resume.path.parent  # the interrupted run's own config and dir
        result = runner.run(config, output_dir, trial=_sweep_trial(config), resume=resume)
        distributed.stop()
    except HarnessError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed trial and goes on
        _exit_with(str(err))
    return result.summary()  # what a sweeper optimizes: the summary metrics and the goal's slack


def _sweep_trial(config: Config) -> TrialLink | None:
    if not config.sweep_trial.study:
        return None
    from harness.sweep.trial import TrialLink  # Optuna, imported by sweep trials only

    return TrialLink.from_config(config)


# Under torchrun every rank runs this command; rank 0 writes for all (harness/distributed.py). The other
# ranks get a run dir that is the working directory, no .hydra/ folder, no log file, warnings only on the
# terminal, and no MLflow writer. Read from torchrun's variables here, before Hydra and torch load.
_OTHER_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
                         "hydra.job_logging.root.level=WARNING", "tracking=none"]


def main() -> None:
    if not _under_torchrun():
        _main()
        return
    # A rank of a torchrun run ends through distributed.leave, with the exit status it would have had:
    # a plain interpreter exit can abort after a run that finished (why: in distributed.leave).
    try:
        _main()
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
    from harness import distributed  # (torch: loaded by a distributed run anyway, not by a plain start)

    distributed.leave(code)


def _main() -> None:
    # Hydra re-raises instead of printing its own multi-line report; we print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if _under_torchrun() and {"-m", "--multirun"} & set(sys.argv[1:]):
        _exit_with("--multirun under torchrun: a sweep's trials each run on one process; start the sweep with "
                   "python -m harness --multirun ..., and one run on several processes with torchrun")
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        sys.argv += _OTHER_RANK_OVERRIDES
    # SIGTERM ends a run the way Ctrl-C does: its MLflow run is closed (KILLED), never left RUNNING.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _hydra_main()
    except Interrupted as stop:
        where = stop.checkpoint
        hint = (f"; {stop.how_to_continue}" if stop.how_to_continue else
                f"; continue with: {_launcher()} resume={where.parent}" if where else "")
        print(f"stopped: {stop}{hint}", file=sys.stderr)
        sys.exit(128 + signal.Signals[stop.signal_name].value)
    except KeyboardInterrupt:
        print("stopped: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        _exit_with(message)


def _under_torchrun() -> bool:
    """One of several processes (torchrun's WORLD_SIZE above 1), read before torch loads."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _launcher() -> str:
    """How this run was started: ``python -m harness``, or torchrun's command on one node."""
    size, per_node = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if size in ("", "1"):
        return "python -m harness"
    if per_node == size:
        return f"torchrun --nproc_per_node={size} -m harness"
    return "the same torchrun command (every node) with -m harness"


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
