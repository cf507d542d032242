"""Stand-in slurmctld/slurmd for one job (started by the stand-in sbatch): runs the batch script, enforces the time
limit and the warning signal the way SLURM does, and records the outcome for the stand-in sacct.

* ``--signal=[B:]SIG[@SECONDS]`` (SECONDS default 60): SIG at ``limit - SECONDS``; without ``B:`` to every process
  of the job's steps (the tasks srun started and all their descendants: a step's cgroup), not to the batch shell;
  with ``B:`` to the batch shell only.
* ``-t``: at the limit SIGTERM to every process of the job (batch and steps), SIGKILL ``KillWait`` later (30 SLURM
  seconds, or ``STANDIN_SLURM_KILL_WAIT`` stand-in seconds); state TIMEOUT.
* When the batch script ends, leftover step processes are killed (the cgroup goes away).

Times are SLURM's scaled by ``STANDIN_SLURM_SECONDS_PER_MINUTE``. Usage: ``_slurmctld.py JOBID`` (stdout/stderr:
the job's log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _standin import (  # noqa: E402
    job_nodelist,
    job_nodes,
    parse_sbatch,
    scaled,
    seconds_per_minute,
    send,
    signal_number,
    state_dir,
    step_roots,
    time_limit_minutes,
    tree,
)


def job_env(job: str, opts: dict[str, str]) -> dict[str, str]:
    """SLURM's environment of the batch script for what the job asked for."""
    nodes = job_nodes(job)
    env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
               SLURM_JOB_NODELIST=job_nodelist(job), SLURM_JOB_NAME=opts.get("--job-name", ""),
               SLURM_SUBMIT_DIR=os.getcwd())
    env["SLURM_NODELIST"] = env["SLURM_JOB_NODELIST"]
    if opts.get("--cpus-per-task") or opts.get("-c"):
        env["SLURM_CPUS_PER_TASK"] = opts.get("--cpus-per-task") or opts["-c"]
    if opts.get("--ntasks") or opts.get("-n"):
        env["SLURM_NTASKS"] = opts.get("--ntasks") or opts["-n"]
    gpus = int(opts.get("--gpus") or 0)
    gres = opts.get("--gres", "")
    if gres.startswith("gpu:"):
        gpus = int(gres.rsplit(":", 1)[1])  # per node
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    elif gpus:
        env["SLURM_GPUS"] = str(gpus)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    return env


def warning(opts: dict[str, str]) -> tuple[int, float, bool] | None:
    """(signal, SLURM seconds before the limit, batch shell only) of ``--signal``, or None."""
    spec = opts.get("--signal")
    if not spec:
        return None
    batch = spec.upper().startswith("B:")
    spec = spec.split(":", 1)[1] if ":" in spec.split("@")[0] else spec
    name, _, secs = spec.partition("@")
    return signal_number(name), float(secs or 60), batch


def log(job: str, t0: float, sig: int, whom: str) -> None:
    with open(state_dir() / f"{job}.signals", "a") as f:
        f.write(f"{time.monotonic() - t0:.2f} {signal.Signals(sig).name} {whom}\n")


def run(job: str) -> tuple[int, str]:
    """Run the job to its end; (exit code, sacct state)."""
    opts = parse_sbatch((state_dir() / f"{job}.args").read_text().splitlines())
    t0 = time.monotonic()
    batch = subprocess.Popen(["bash", "-c", opts["--wrap"]], env=job_env(job, opts), cwd=opts.get("-D") or None)
    limit = seconds_per_minute() * time_limit_minutes(opts.get("-t") or opts.get("--time")) \
        if (opts.get("-t") or opts.get("--time")) else None
    warn = warning(opts)
    kill_wait = float(os.environ.get("STANDIN_SLURM_KILL_WAIT") or scaled(30))
    while batch.poll() is None:
        now = time.monotonic() - t0
        if warn is not None and limit is not None and now >= limit - scaled(warn[1]):
            sig, _, only_batch = warn
            send([batch.pid] if only_batch else tree(step_roots(job)), sig)
            log(job, t0, sig, "batch" if only_batch else "steps")
            warn = None
        if limit is not None and now >= limit:
            everything = lambda: tree([batch.pid, *step_roots(job)])  # noqa: E731
            send(everything(), signal.SIGTERM)
            log(job, t0, signal.SIGTERM, "all")
            deadline = time.monotonic() + kill_wait
            while time.monotonic() < deadline and everything():
                time.sleep(0.05)
            send(everything(), signal.SIGKILL)
            log(job, t0, signal.SIGKILL, "all")
            batch.wait()
            return batch.returncode, "TIMEOUT"
        time.sleep(0.05)
    send(tree(step_roots(job)), signal.SIGKILL)  # the job's cgroup goes away with it
    return batch.returncode, "COMPLETED" if batch.returncode == 0 else "FAILED"


def main() -> int:
    job = sys.argv[1]
    code, state = run(job)
    d = state_dir()
    (d / f"{job}.rc").write_text(f"{code}\n")
    (d / f"{job}.state.tmp").write_text(f"{state}\n")
    (d / f"{job}.state.tmp").replace(d / f"{job}.state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
