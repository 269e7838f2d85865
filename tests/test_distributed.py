"""One run on several processes with torchrun (DDP over gloo, on this machine's CPU), as a user starts
it: ``torchrun --nproc_per_node=2 -m harness ...``. What needs a cluster (NCCL on GPUs, several nodes)
is in docs/distributed.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from .conftest import FAST, REPO, run_cli
from .test_interrupts import wait_for

pytestmark = pytest.mark.slow

PRUNED = ["features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"]


def torchrun(args: list[str]) -> list[str]:
    """The command line of ``torchrun --nproc_per_node=2`` (a free rendezvous port: ``--standalone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return {**env, "OMP_NUM_THREADS": "1"}


def run_torchrun(args: list[str], outputs: Path, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    cmd = torchrun(["-m", "harness", *args, f"outputs_dir={outputs}", f"hydra.run.dir={outputs}/run"])
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def weight_sparsity(path: Path) -> float:
    state = torch.load(path)
    zeros = sum(int((state[name] == 0).sum()) for name in PRUNED)
    return zeros / sum(state[name].numel() for name in PRUNED)


def test_torchrun_on_two_processes_makes_one_run_one_summary_and_the_one_process_result(tmp_path):
    args = ["prune.target_sparsity=0.9", "train.device=cpu"]
    two = run_torchrun(args, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(args, tmp_path / "one", timeout=400)
    assert one.returncode == 0, one.stderr[-4000:]

    # One writer: one summary printed, one run dir, one baseline cache entry, one MLflow run.
    assert two.stdout.count("goal MET") + two.stdout.count("goal MISSED") == 1, two.stdout
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir()) == ["baselines", "mlartifacts", "run"]
    assert len(list((tmp_path / "two" / "baselines").iterdir())) == 1
    assert (tmp_path / "two" / "run" / "summary.html").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert run.info.status == "FINISHED"
    assert "masks: the same on all 2 ranks at each of the" in two.stderr + two.stdout

    # 90% counted from the saved weights, and the accuracy of the one-process run within noise.
    assert weight_sparsity(tmp_path / "two" / "run" / "pruned_model.pt") == pytest.approx(0.9, abs=1e-3)
    assert run.data.metrics["final/sparsity"] == pytest.approx(0.9, abs=1e-3)
    one_client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'one' / 'mlflow.db'}")
    (single,) = one_client.search_runs([one_client.get_experiment_by_name("pruning").experiment_id])
    for name in ("baseline/accuracy", "final/accuracy", "final/test_accuracy"):
        assert abs(run.data.metrics[name] - single.data.metrics[name]) <= 0.03, (name, run.data.metrics[name],
                                                                                single.data.metrics[name])


def probe(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "masks.json"
    cmd = torchrun([str(REPO / "tests" / "ddp_probe.py"), *extra, str(out), *FAST, "prune.target_sparsity=0.8",
                    "train.device=cpu", f"outputs_dir={tmp_path}", "tracking=none"])
    # (a script, not a module: the checkout on its path, as `-m harness` has it from the working directory)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_rank_holds_the_same_masks_after_every_update_and_epoch(tmp_path):
    rank0, rank1 = probe(tmp_path)
    assert rank0["error"] is None and rank1["error"] is None
    updates = [s for s in rank0["seen"] if s[0] == "update"]
    assert len(updates) >= 4 and len({digest for _, _, digest in updates}) == len(updates)  # the masks moved
    assert rank0["seen"] == rank1["seen"]


def test_masks_that_drift_apart_across_ranks_stop_the_run_on_every_rank(tmp_path):
    rank0, rank1 = probe(tmp_path, "--drift")
    for rank in (rank0, rank1):
        assert rank["error"] and "the masks of rank(s) [1] differ from rank 0's" in rank["error"], rank


def test_an_interrupted_two_process_run_saves_one_checkpoint_and_resumes_to_the_same_weights(tmp_path):
    args = ["prune.target_sparsity=0.9", "train.device=cpu", "train.epochs=3", "train.finetune_epochs=12",
            "prune.end_epoch=8"]
    outputs = tmp_path / "straight"
    straight = run_torchrun(args, outputs)  # also caches the baseline the interrupted run loads
    assert straight.returncode == 0, straight.stderr[-4000:]

    run_dir = tmp_path / "stopped"
    cmd = torchrun(["-m", "harness", *args, f"outputs_dir={outputs}", f"hydra.run.dir={run_dir}"])
    process = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        wait_for(process, "prune epoch 2/12")
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches torchrun and both ranks
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert list(run_dir.glob("*.pt")) == [run_dir / "checkpoint.pt"], output[-3000:]
    stops = [line for line in output.splitlines() if line.startswith("stopped: interrupted by SIGINT at epoch")]
    assert len(stops) == 2 and len({line.split(";")[0] for line in stops}) == 1, stops  # both at the same step
    assert f"continue with: torchrun --nproc_per_node=2 -m harness resume={run_dir}" in output

    resumed = subprocess.run(torchrun(["-m", "harness", f"resume={run_dir}"]), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming" in resumed.stderr + resumed.stdout
    ours, theirs = torch.load(run_dir / "pruned_model.pt"), torch.load(outputs / "run" / "pruned_model.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_rank_leaves_with_its_exit_status_after_the_exit_handlers_and_with_its_output_flushed():
    # distributed.leave skips the interpreter's teardown (a gloo thread can abort it); what a plain exit
    # does besides must still happen: exit handlers (the MLflow writer's close), buffered output written.
    script = ("import atexit; from harness import distributed; "
              "atexit.register(lambda: print('handler ran')); print('buffered', end=' '); distributed.leave(3)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "buffered handler ran\n"


def test_a_sweep_under_torchrun_is_a_one_line_error(tmp_path):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    result = subprocess.run([sys.executable, "-m", "harness", "--multirun", "+sweep=max_sparsity",
                             f"outputs_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --multirun under torchrun: a sweep's trials each run on one process; start the sweep with "
        "python -m harness --multirun ..., and one run on several processes with torchrun"]
    assert not any(tmp_path.iterdir())  # nothing written
