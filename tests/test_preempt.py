"""Stopping for resubmission (runtime/preempt.py): the stop flag and its handlers, the stage runner's exit 75 with
the MLflow run KILLED and no outputs, the launcher's view of stopped ranks, and the multi-node launcher's refusals.
The end-to-end runs (torchrun, the SLURM profile) are in tests/test_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from localmim.config.pretrain import PretrainConfig
from localmim.runtime import preempt
from localmim.utils.launch import main as launch_main
from localmim.utils.launch import stopped_for_resubmit
from tests.conftest import ROOT, cli_env
from tests.pretrain_helpers import make_shards


def test_stop_signals_set_the_flag_inside_the_block_only():
    before = signal.getsignal(signal.SIGUSR1)
    with preempt.handlers():
        assert not preempt.stop_requested() and preempt.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)  # the handler runs between bytecodes
        os.kill(os.getpid(), signal.SIGURG)  # the first signal is the one named
        assert preempt.stop_requested() and preempt.requested() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    with preempt.handlers():  # a new block starts cleared
        assert not preempt.stop_requested()


def test_after_a_stop_the_handlers_stay_so_a_late_signal_cannot_kill_the_exit():
    before = {s: signal.getsignal(s) for s in preempt.STOP_SIGNALS}
    try:
        with pytest.raises(preempt.StopForResubmit) as e:
            with preempt.handlers():
                preempt.stop(None, "step 3", "ckpt.pt")
        assert e.value.code == preempt.RESUBMIT_EXIT and "at step 3; checkpoint ckpt.pt" in str(e.value)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun tearing the ranks down: must not end this process
        time.sleep(0.01)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


_FORKED = """
import os, signal, time
from localmim.runtime import preempt
with preempt.handlers():
    pid = os.fork()
    if pid == 0:  # a DataLoader worker: ignores the warning, dies of SIGTERM as it would by default
        time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGURG)
    time.sleep(0.5)
    alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print(alive, os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, preempt.requested())
"""


def test_forked_workers_ignore_the_warning_and_die_of_sigterm():
    out = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=cli_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(int(signal.SIGTERM)), "None"]


def test_stop_for_resubmit_uncaught_exits_75():
    code = "from localmim.runtime.preempt import StopForResubmit; raise StopForResubmit('stopped')"
    assert subprocess.run([sys.executable, "-c", code], env=cli_env(), timeout=120).returncode == 75


def test_launcher_reports_75_when_the_ranks_stopped_or_were_torn_down_after():
    f = lambda *codes: {r: SimpleNamespace(exitcode=c) for r, c in enumerate(codes)}  # noqa: E731
    assert stopped_for_resubmit(f(75, 75)) and stopped_for_resubmit(f(-signal.SIGTERM, 75))
    assert not stopped_for_resubmit(f(1, 75)) and not stopped_for_resubmit(f(-signal.SIGTERM))


def test_planned_world_names_nnodes():
    with pytest.raises(ValueError, match=r"world_size=6 .*\(world size = nnodes=3 x nproc_per_node=2\)"):
        PretrainConfig(global_batch=32, batch_size=4, nproc_per_node=2, nnodes=3)
    assert PretrainConfig(global_batch=32, batch_size=4, nproc_per_node=2, nnodes=2).accum_for(4) == 2


def test_several_nodes_need_a_slurm_allocation_with_enough_nodes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("LOCALMIM_TORCHRUN_ARGS", raising=False)
    assert launch_main(["--nproc-per-node", "1", "--nnodes", "2", "pretrain"]) == 2
    assert "2 nodes asked for (nnodes) outside a SLURM allocation" in capsys.readouterr().err
    # a one-node job (the stand-in's record of it): SLURM's node list says so
    (tmp_path / "7.args").write_text("--nodes=1\n--wrap=true\n")
    monkeypatch.setenv("STANDIN_SLURM_STATE", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("PATH", f"{ROOT / 'tests/slurm_standin'}:{os.environ['PATH']}")
    assert launch_main(["--nproc-per-node", "1", "--nnodes", "2", "pretrain"]) == 2
    assert "2 nodes asked for (nnodes) but SLURM job 7 has 1 (127.0.0.1)" in capsys.readouterr().err


def _runs(uri: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["localmim"], order_by=["start_time ASC"], output_format="list")


def test_stage_stopped_by_a_signal_ends_its_run_killed_writes_nothing_and_resumes(tmp_path):
    """`localmim pretrain` (one process, MLflow on) gets SIGUSR1 right after its first epoch's checkpoint: a checkpoint
    of its own at the next optimizer step, exit 75 with its line last, the MLflow run KILLED and tagged, no output;
    run again, it resumes at that step."""
    make_shards(tmp_path / "shards", n=64, per_shard=16, size=(32, 40))
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree["pretrain"].update(model="localmim_vit_micro_patch8", input_size=32, global_batch=4, batch_size=4, epochs=2,
                            warmup_epochs=1, num_workers=0, log_every=1, device="cpu", ckpt_minutes=0, ckpt_every=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "localmim.cli", "pretrain", "--shards", "shards", "--out", "out", "--ckpt-dir",
           "ckpt", "--metrics", "metrics.json", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("ckpt/*/ckpt-*.pt")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-3000:]
    stop = re.fullmatch(r"localmim pretrain: stopped by SIGUSR1 at epoch 1, step (\d+) of 16 \(optimizer step (\d+)\); "
                        r"checkpoint (\S+); run again to resume \(exit 75\)", err.strip().splitlines()[-1])
    assert stop, err[-3000:]
    assert not (tmp_path / "out" / "encoder.pt").exists() and not (tmp_path / "metrics.json").exists()
    (run,) = _runs(uri)
    tags = run.data.tags
    assert run.info.status == "KILLED" and tags["stopped"] == "preempted" and tags["stopped_by"] == "SIGUSR1"
    assert tags["resume_checkpoint"] == stop.group(3) and (tmp_path / stop.group(3)).is_file()

    again = subprocess.run(cmd, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {stop.group(3)} (epoch 1, step {stop.group(2)})" in again.stdout
    assert [r.info.status for r in _runs(uri)] == ["KILLED", "FINISHED"]
    assert (tmp_path / "out" / "encoder.pt").is_file()
