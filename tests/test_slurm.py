"""Pretraining on a cluster, end to end: the real Snakemake with the real SLURM executor plugin against the stand-in
SLURM commands (tests/slurm_standin: time limits and --signal as SLURM applies them, srun starting local "nodes"),
torchrun with gloo on CPU. Every run is compared with one uninterrupted run on one node with two processes, started
through the launcher alone (no SLURM, no Snakemake):

* a job stopped by its time limit's warning (or a stop signal sent by hand) checkpoints, exits 75 and resumes;
* a rule whose training needs three time limits finishes through chained jobs (the profile's retries);
* the rule on two nodes with one process each (srun, c10d rendezvous) gives the same encoder, bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BIN, ROOT, cli_env, copy_repo
from tests.pretrain_helpers import make_shards
from tests.resume import same_weights

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).parent / "slurm_standin"
# Snakemake runs a job with OMP_NUM_THREADS = the rule's threads; the tests set them to 1 (--set-threads), as in the
# runs made without Snakemake: another thread count sums in another order, and bit-identity is lost.
THREADS = "1"
# 3 epochs of 180 steps (1440 images, global batch 8 = 2 processes x 4; a few seconds an epoch on 2 cores);
# log_every beyond the run: the loop checks for a stop at epoch ends only (a stopped job has trained whole epochs)
STEPS = 180
PRETRAIN = dict(model="localmim_vit_micro_patch8", input_size=32, global_batch=8, batch_size=4, epochs=3,
                warmup_epochs=1, blr=1e-2, num_workers=0, shuffle_buffer=4, log_every=1000, device="cpu",
                ckpt_minutes=0, nproc_per_node=2, nnodes=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = cli_env(STANDIN_SLURM_STATE=str(state), LOCALMIM_TRACKING="0", LOCALMIM_RDZV_PORT=str(_free_port()), **extra)
    env["PATH"] = f"{STANDIN}:{env['PATH']}"
    return env


def _direct_env() -> dict[str, str]:
    """The environment of the runs started here without SLURM (no MLflow; the thread count Snakemake gives)."""
    return cli_env(LOCALMIM_TRACKING="0", OMP_NUM_THREADS=THREADS)


def _params(path: Path, pretrain: dict, cluster_rule: dict | None = None) -> None:
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree["pretrain"].update(pretrain)
    if cluster_rule is not None:
        tree["cluster"]["rules"]["pretrain"] = cluster_rule
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def _encoder(out: Path) -> dict:
    return torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards") / "train"
    make_shards(d, n=8 * STEPS, per_shard=2 * STEPS, size=(32, 40))
    return d


class Reference:
    """The uninterrupted run (1 node x 2 processes, the launcher alone), started in the background when the module
    starts and awaited by the first test that needs it."""

    def __init__(self, root: Path, shards: Path):
        self.root = root
        _params(root / "params.yaml", PRETRAIN)
        cmd = [sys.executable, "-m", "localmim.utils.launch", "--nproc-per-node", "2", "--device", "cpu", "pretrain",
               "--params", "params.yaml", "--shards", str(shards), "--out", "out", "--ckpt-dir", "ckpt", "--metrics",
               "metrics.json", "--no-progress"]
        self.log = open(root / "log", "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(cmd, cwd=root, env=_direct_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def encoder(self) -> dict:
        if self.proc.returncode is None:
            rc = self.proc.wait(timeout=900)
            self.log.close()
            assert rc == 0, (self.root / "log").read_text()[-4000:]
        return _encoder(self.root / "out")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    ref = Reference(tmp_path_factory.mktemp("reference"), shards)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


# ------------------------------------------------------------------------------------- the launcher, signalled


def _ranks(launcher: int) -> dict[int, int]:
    """Rank -> pid of the launcher's torchrun workers."""
    out = {}
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if int((env.parent / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            items = dict(kv.split("=", 1) for kv in env.read_bytes().decode(errors="replace").split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in items:
            out[int(items["RANK"])] = int(env.parent.name)
    return out


def _newest_step(ckpt: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in ckpt.glob("*/ckpt-*.pt")]
    return max(steps, default=-1)


LAUNCH = [sys.executable, "-m", "localmim.utils.launch", "--nproc-per-node", "2", "--device", "cpu", "pretrain",
          "--params", "params.yaml", "--out", "out", "--ckpt-dir", "ckpt", "--metrics", "metrics.json", "--no-progress"]
STOP = re.compile(r"localmim pretrain: stopped by (SIG\w+|a stop signal on another rank) at epoch (\d+), step \d+ of "
                  r"\d+ \(optimizer step (\d+)\)")


def _stopped_run(root: Path, shards: Path, send) -> tuple[subprocess.CompletedProcess, int]:
    """Launch pretraining, wait for its next epoch's checkpoint (the loop is running), call ``send(launcher pid)``;
    returns the finished process and the step its stop line names."""
    before = _newest_step(root / "ckpt")
    p = subprocess.Popen([*LAUNCH, "--shards", str(shards)], cwd=root, env=_direct_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _newest_step(root / "ckpt") <= before and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be signalled"
    send(p.pid)
    out, err = p.communicate(timeout=300)
    stop = STOP.search(err)
    assert p.returncode == 75 and stop, err[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), int(stop.group(3))


def test_stop_signals_checkpoint_exit_75_and_resume_to_the_uninterrupted_encoder(tmp_path, shards, reference):
    """SIGTERM to the launcher (a local `kill`, srun passing scancel on) reaches the ranks through it; SIGURG to rank
    1 alone stops rank 0 too (the collective check). Each is sent right after an epoch's checkpoint: the ranks stop
    at the next optimizer step, mid-epoch, with a checkpoint of their own (the next run resumes at that step), exit
    75 with the launcher's line last and write no outputs; the third run finishes, equal to the uninterrupted run."""
    _params(tmp_path / "params.yaml", {**PRETRAIN, "log_every": 1})  # a stop check after every optimizer step
    first, step = _stopped_run(tmp_path, shards, lambda pid: os.kill(pid, signal.SIGTERM))
    assert first.stderr.strip().splitlines()[-1].startswith("localmim launch: the ranks stopped for resubmission")
    assert STOP.search(first.stderr).group(1) == "SIGTERM" and step % STEPS  # mid-epoch: not an epoch's checkpoint
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()

    second, step2 = _stopped_run(tmp_path, shards, lambda pid: os.kill(_ranks(pid)[1], signal.SIGURG))
    assert f"(epoch {step // STEPS}, step {step})" in second.stdout  # resumed where the first stopped
    assert STOP.search(second.stderr).group(1) == "a stop signal on another rank"  # rank 0's line: rank 1 was told
    assert step2 > step and step2 % STEPS

    third = subprocess.run([*LAUNCH, "--shards", str(shards)], cwd=tmp_path, env=_direct_env(), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"(epoch {step2 // STEPS}, step {step2})" in third.stdout
    assert same_weights(_encoder(tmp_path / "out"), reference.encoder())


# ------------------------------------------------------------------------------------------ the SLURM profile


@dataclass
class Job:
    id: str
    args: list[str]
    state: str
    signals: str
    log: str


def _pretrain_repo(root: Path, shards: Path, pretrain: dict, cluster_rule: dict) -> Path:
    """A copy of this repository holding pretraining's inputs (the shards; empty val, views and imported folders:
    the kNN monitor is off, the data online, nothing imported) and tiny params: Snakemake plans `pretrain` alone
    (the inputs exist, newer than the code upstream rules read, and there is no record to trigger a rerun)."""
    repo = copy_repo(root)
    shutil.copytree(shards, repo / "data/shards/train")
    for f in [*(repo / "data/shards/train").iterdir(), repo / "data/shards/train"]:  # newer than the copied code
        os.utime(f)  # (synth's input), as if built here
    for d in ("data/shards/val", "data/views", "data/imported"):
        (repo / d).mkdir(parents=True)
    _params(repo / "params.yaml", pretrain, cluster_rule)
    return repo


def _snakemake(repo: Path, state: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm",
           "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs", "--set-threads",
           "pretrain=1", "--allowed-rules", "pretrain", "--", "data/pretrain"]
    return subprocess.run(cmd, cwd=repo, env=_env(state, **env), capture_output=True, text=True, timeout=900)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _jobs(repo: Path, state: Path) -> list[Job]:
    """The stand-in's jobs, in submission order, with their SLURM logs (all are pretrain's)."""
    logs = repo / ".snakemake/slurm_logs/rule_pretrain"
    return [Job(f.stem, f.read_text().splitlines(), _read(state / f"{f.stem}.state").strip(),
                _read(state / f"{f.stem}.signals"), _read(logs / f"{f.stem}.log"))
            for f in sorted(state.glob("*.args"))]


def test_time_limit_chains_jobs_that_resume_to_the_uninterrupted_encoder(tmp_path, shards, reference):
    """`cluster.rules.pretrain`: runtime 1 minute, stop_seconds 45 (SIGURG 15 s into each job, once its launcher is
    up, before its second epoch): the training needs about three of those jobs. Each stops at its next epoch end
    with a checkpoint and exits 75 (on SIGURG, or SIGTERM at the limit where the machine is so slow that the warning
    came before the launcher was up), Snakemake submits it again (the profile's retries), the next one resumes there,
    and the encoder equals the uninterrupted run's bit for bit."""
    # ckpt_every beyond the run: no epoch checkpoint but the last one; a job resumes from its predecessor's stop
    repo = _pretrain_repo(tmp_path / "repo", shards, {**PRETRAIN, "ckpt_every": 10},
                          {"cpus": 1, "mem_mb": 1000, "runtime": 1, "stop_seconds": 45})
    state = tmp_path / "slurm"
    p = _snakemake(repo, state, STANDIN_SLURM_KILL_WAIT="60")
    jobs = _jobs(repo, state)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:] + "\n".join(j.log[-3000:] for j in jobs)
    assert len(jobs) >= 2 and (p.stdout + p.stderr).count("Trying to restart job") == len(jobs) - 1
    *stopped, last = jobs
    assert last.state == "COMPLETED"
    assert all(job.args[job.args.index("-t") + 1] == "1" and "--signal=URG@45" in job.args for job in jobs)
    for job, after in zip(stopped, jobs[1:], strict=True):
        assert "SIGURG steps" in job.signals  # SLURM's warning went to the job step's processes, not the batch shell
        stop = re.search(r"localmim pretrain: stopped by SIG(?:URG|TERM) at the end of epoch (\d+) \(optimizer step "
                         r"(\d+)\)",
                         job.log)
        assert stop, job.log[-3000:]  # a checkpoint, then exit 75 through the launcher and the rule's shell
        assert "localmim launch: the ranks stopped for resubmission" in job.log
        assert "returned non-zero exit status 75" in job.log
        epoch, step = int(stop.group(1)), int(stop.group(2))
        assert f"(epoch {epoch + 1}, step {step})" in after.log  # the next job resumes there
    assert same_weights(_encoder(repo / "data/pretrain"), reference.encoder())


def test_two_node_rule_equals_one_node_with_two_processes(tmp_path, shards, reference):
    """`pretrain.nnodes: 2`, `nproc_per_node: 1`: the job asks SLURM for two nodes and one task each, the launcher
    starts itself once per node with srun (two local "nodes", gloo on 127.0.0.1), and the encoder equals the one
    node x two processes run bit for bit (the same global batch)."""
    repo = _pretrain_repo(tmp_path / "repo", shards, {**PRETRAIN, "nnodes": 2, "nproc_per_node": 1},
                          {"cpus": 1, "mem_mb": 1000, "runtime": 30})
    state = tmp_path / "slurm"
    p = _snakemake(repo, state)
    jobs = _jobs(repo, state)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:] + "\n".join(j.log[-3000:] for j in jobs)
    (job,) = jobs
    assert {"--nodes=2", "--ntasks=2", "--signal=URG@300"} <= set(job.args)
    assert not any(a.startswith(("--gpus", "--gres")) for a in job.args)  # device cpu
    (call,) = (state / f"{job.id}.srun").read_text().splitlines()  # the launcher's; the job step ran no srun
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=1"} <= set(call.split())
    assert len((state / f"{job.id}.steps").read_text().split()) == 2  # one task per node
    assert same_weights(_encoder(repo / "data/pretrain"), reference.encoder())
