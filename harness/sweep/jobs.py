"""What crosses Hydra's launcher: the task a job runs, and what comes back as an :class:`Outcome`.

With Hydra's basic launcher a trial's run is a call in the worker's process; with
``hydra/launcher=submitit_local`` or ``submitit_slurm`` it is a submitit job, another process
(or machine) that unpickles the task, runs it and pickles Hydra's ``JobReturn`` back: the run's
summary, or the exception it raised. So what the run raises must survive pickling, and a job
that ends without giving anything back (killed, out of memory, its node lost) is a failed trial
with the launcher's reason, not a crashed sweep.
"""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf

from harness.errors import Interrupted, RunStopped
from harness.sweep.loop import Outcome, describe_outcome


class JobInterrupted(RunStopped):
    """An :class:`Interrupted` run, as it crosses a process boundary (``Interrupted`` carries the training
    loop's state and cannot be unpickled); the worker stops the sweep on it as on ``Interrupted``."""


class LaunchedTask:
    """The task function as a launcher runs it, in this process or in a job: the same call, with an
    interruption turned into one that can be pickled back."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def __call__(self, config: DictConfig) -> Any:
        try:
            return self.task(config)
        except Interrupted as stop:
            raise JobInterrupted(str(stop)) from None


def launch_job(launcher: Any, overrides: list[str], job_index: int) -> Outcome:
    """Run one job through Hydra's configured launcher and describe how it ended."""
    try:
        (result,) = launcher.launch([overrides], initial_job_idx=job_index)
    except Exception as err:  # submitit's UncompletedJobError / FailedJobError: no result came back
        lines = str(err).strip().splitlines()
        return Outcome(error=f"the job gave back no result ({type(err).__name__}: {lines[0] if lines else ''})")
    value = result._return_value if result.status == JobStatus.FAILED else result.return_value
    # The job's own folder (its log, its artifacts): the cwd stays put with hydra.job.chdir=false.
    folder = OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg else None
    return describe_outcome(value, folder or result.working_dir)
