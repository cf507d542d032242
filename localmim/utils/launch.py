"""``python -m localmim.utils.launch --nproc-per-node N [--nnodes M] STAGE ARGS...``: a stage under torchrun.

The DAG (Snakemake rules and dvc.yaml) launches the training stages through this wrapper instead of calling
``torchrun`` directly. It runs torchrun's own launcher (``torch.distributed.run``) in this process with every
rank's stderr tee'd to a temporary log directory, so that when a rank fails

* torchrun's ``ChildFailedError`` traceback (about twenty lines of launcher frames) is not printed, and
* the stage's own one-line error (``localmim <stage>: error: ...``) is printed again as the very last line,

and the exit code is the failing rank's (75 when the ranks stopped for resubmission, ``runtime/preempt.py``).

**Nodes.** One node by default (``--standalone``). With ``--nnodes M`` > 1 inside a SLURM allocation (a batch job,
or ``salloc -N M`` around ``dvc repro``) it starts itself once per node with ``srun`` (one task per node); each
copy runs torchrun with c10d rendezvous on the allocation's first host (the job's node list from ``scontrol show
job``, expanded by ``scontrol show hostnames``), rendezvous id ``$SLURM_JOB_ID``; that host's copy hosts the store;
the port is ``29500 + job id % 1000`` (``LOCALMIM_RDZV_PORT`` overrides it). Outside SLURM, set
``LOCALMIM_TORCHRUN_ARGS`` to torchrun's rendezvous options and start the command once per node yourself.

**Signals.** ``SIGURG`` (the SLURM profile's warning before the time limit), ``SIGUSR1`` and ``SIGTERM`` are passed
on to the children (the ranks, or ``srun``); ``SIGURG`` again every few seconds until they exit (a rank still
starting has no handler yet and would miss a single one). torchrun is told not to act on ``SIGTERM`` itself
(``--signals-to-handle``): it would kill the ranks 30 s later, maybe in the middle of a checkpoint.

When the job was given fewer GPUs (``CUDA_VISIBLE_DEVICES``) than processes asked for, it stops before launching,
naming both numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from localmim.utils.signals import RESUBMIT_EXIT, STOP_SIGNALS, WARNING_SIGNAL

ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:)?(localmim [\w-]+: error: .*)$")
PROG = "localmim launch"
RDZV_PORT_ENV = "LOCALMIM_RDZV_PORT"  # c10d rendezvous port on the first node (default: 29500 + job id % 1000)
SRUN_WAIT = 300  # seconds srun lets the other nodes run on after the first one exits (a crashed node's peers hang)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # what torchrun's agent handles itself (tearing the ranks down)
REPEAT_SECONDS = 2.0  # a received stop signal is passed on again this often while the children live


def visible_gpus() -> int | None:
    """Number of GPUs this job may use per ``CUDA_VISIBLE_DEVICES`` (None when unset: no restriction known)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return None
    return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])


def error_lines(log_dir: Path) -> list[str]:
    """The stage error lines (``localmim <stage>: error: ...``) in the ranks' stderr logs, rank 0 first."""
    found: list[str] = []
    for log in sorted(log_dir.rglob("stderr.log"), key=lambda p: (p.parent.name.isdigit(), p.parent.name)):
        for line in log.read_text(errors="replace").splitlines():
            m = ERROR_LINE.match(line.strip())
            if m and m.group(1) not in found:
                found.append(m.group(1))
    return found


# ----------------------------------------------------------------------------------------- signals to children


def _children() -> list[int]:
    """This process's children (from /proc; empty where there is none)."""
    me, kids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == me:
            kids.append(int(stat.parent.name))
    return kids


class Forwarder:
    """Passes the stop signals this process receives on to its children. The warning (``SIGURG``, ignored by default)
    is passed on again every :data:`REPEAT_SECONDS` while they live: a rank still starting has no handler yet and
    would miss a single one. The others are passed on once: their default action ends a process, and a rank that
    already stopped (its handlers gone) must not be killed on its way out."""

    def __init__(self) -> None:
        self.repeating = False

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG001
        _send(signum)
        if signum == WARNING_SIGNAL and not self.repeating:
            self.repeating = True
            threading.Thread(target=self._repeat, args=(signum,), daemon=True).start()

    @staticmethod
    def _repeat(signum: int) -> None:
        while True:
            time.sleep(REPEAT_SECONDS)
            _send(signum)


def _send(signum: int) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------------------- topology


def torchrun_args(nproc: int, log_dir: Path, stage_argv: list[str], rdzv: list[str] | None = None) -> list[str]:
    extra = rdzv if rdzv is not None else shlex.split(os.environ.get("LOCALMIM_TORCHRUN_ARGS", ""))
    topology = extra if extra else ["--standalone"]
    # torchrun's agent would handle SIGTERM by killing the ranks 30 s later (the Forwarder passes it on instead); it
    # keeps SIGINT (Ctrl-C), SIGHUP and SIGQUIT
    return [*topology, f"--nproc-per-node={nproc}", "--tee=2", f"--log-dir={log_dir}",
            f"--signals-to-handle={TORCHRUN_SIGNALS}", "-m", "localmim.cli", *stage_argv]


def node_rdzv(nnodes: int, endpoint: str) -> list[str]:
    """torchrun's rendezvous on this node of a SLURM step: node 0 (the nodelist's first host, the endpoint's) hosts
    the c10d store (explicitly: a host name in the nodelist need not match what the machine calls itself)."""
    host = int(os.environ.get("SLURM_NODEID", "0")) == 0
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'localmim')}", f"--rdzv-conf=is_host={int(host)}"]


def _scontrol(*args: str) -> str:
    p = subprocess.run(["scontrol", *args], capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"`scontrol {' '.join(args)}` failed: {p.stderr.strip() or 'no answer'}")
    return p.stdout


def slurm_job(job: str) -> tuple[list[str], int | None]:
    """(hosts in SLURM's order, CPUs per task) of job ``job``, asked of SLURM: the Snakemake executor's job step
    removes ``SLURM_*`` variables but the job id from what it runs, ``SLURM_JOB_NODELIST`` included."""
    info = dict(re.findall(r"(\S+?)=(\S*)", _scontrol("show", "job", "-o", job)))
    if not info.get("NodeList") or info["NodeList"] == "(null)":
        raise RuntimeError(f"SLURM job {job} has no node list yet")
    hosts = _scontrol("show", "hostnames", info["NodeList"]).split()
    cpus = info.get("CPUs/Task", "")
    return hosts, int(cpus) if cpus.isdigit() else None


def rdzv_port() -> int:
    if os.environ.get(RDZV_PORT_ENV):
        return int(os.environ[RDZV_PORT_ENV])
    return 29500 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 1000  # jobs sharing a first node differ


def srun_nodes(nproc: int, nnodes: int, stage_argv: list[str], device: str | None) -> int:
    """Start this launcher once per node of the SLURM allocation (``srun``, one task per node); returns srun's exit
    status (the highest of the nodes'). Its own errors are printed as one line (exit 2)."""
    job = os.environ["SLURM_JOB_ID"]
    try:
        hosts, cpus = slurm_job(job)
    except (OSError, RuntimeError) as e:
        print(f"{PROG}: error: cannot list the nodes of SLURM job {job}: {e}", file=sys.stderr)
        return 2
    if len(hosts) < nnodes:
        print(f"{PROG}: error: {nnodes} nodes asked for (nnodes) but SLURM job {job} has {len(hosts)} "
              f"({' '.join(hosts)})", file=sys.stderr)
        return 2
    cmd = ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
           f"--wait={SRUN_WAIT}", *([f"--cpus-per-task={cpus}"] if cpus else [])]  # a step takes 1 CPU by default
    cmd += [sys.executable, "-m", "localmim.utils.launch", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
            f"--rdzv-endpoint={hosts[0]}:{rdzv_port()}", *(["--device", device] if device else []), *stage_argv]
    sys.stdout.flush()
    return subprocess.Popen(cmd).wait()  # the Forwarder passes stop signals on to srun, which passes them to the nodes


# ---------------------------------------------------------------------------------------------------- launch


def stopped_for_resubmit(failures: dict) -> bool:
    """Whether the ranks stopped for resubmission: some exited 75, and the others too or were torn down by torchrun
    (SIGTERM / SIGKILL) once the first had exited."""
    codes = {f.exitcode for f in failures.values()}
    return RESUBMIT_EXIT in codes and codes <= {RESUBMIT_EXIT, -signal.SIGTERM, -signal.SIGKILL}


def run_torchrun(nproc: int, stage_argv: list[str], rdzv: list[str] | None) -> int:
    """torchrun in this process; the failing rank's exit code (its error line printed last), else 0."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log_dir = Path(tempfile.mkdtemp(prefix="localmim-launch-"))
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(nproc, log_dir, stage_argv, rdzv)))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if stopped_for_resubmit(e.failures):
            code = RESUBMIT_EXIT
            lines = [f"{PROG}: the ranks stopped for resubmission after a checkpoint (exit {RESUBMIT_EXIT}); run "
                     f"again to resume"]
        else:
            lines = error_lines(log_dir) or [
                f"{PROG}: error: rank {rank} of `localmim {' '.join(stage_argv[:1])}` exited with code "
                f"{failure.exitcode} (its output is above)"]
        sys.stdout.flush()
        print(lines[0], file=sys.stderr, flush=True)
        return code
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def launch(nproc: int, stage_argv: list[str], device: str | None = None, nnodes: int = 1,
           rdzv_endpoint: str | None = None) -> int:
    """Run ``localmim.cli STAGE_ARGV`` under torchrun with ``nproc`` processes per node on ``nnodes`` nodes;
    returns the exit code."""
    gpus = visible_gpus()
    if device != "cpu" and gpus is not None and 0 < gpus < nproc:
        print(f"{PROG}: error: {nproc} processes asked for (nproc_per_node) but this job was given {gpus} GPU(s) "
              f"(CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})", file=sys.stderr)
        return 2
    Forwarder().install()
    if nnodes == 1 or os.environ.get("LOCALMIM_TORCHRUN_ARGS"):
        return run_torchrun(nproc, stage_argv, None)
    if rdzv_endpoint:  # one node's copy, started by srun
        return run_torchrun(nproc, stage_argv, node_rdzv(nnodes, rdzv_endpoint))
    if os.environ.get("SLURM_JOB_ID"):
        return srun_nodes(nproc, nnodes, stage_argv, device)
    print(f"{PROG}: error: {nnodes} nodes asked for (nnodes) outside a SLURM allocation: run it in a job (sbatch, "
          f"or `salloc -N {nnodes}` around dvc repro), or set LOCALMIM_TORCHRUN_ARGS to torchrun's rendezvous "
          f"options and start it once per node", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes (one per GPU) on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (several: srun inside a SLURM allocation)")
    p.add_argument("--device", default=None, help="the stage's device param (cpu skips the GPU count check)")
    p.add_argument("--rdzv-endpoint", default=None, help=argparse.SUPPRESS)  # set by the srun'ing copy
    p.add_argument("stage_argv", nargs=argparse.REMAINDER, help="localmim STAGE [ARGS...]")
    args = p.parse_args(argv)
    if not args.stage_argv:
        p.error("missing the stage command (e.g. `pretrain --out data/pretrain`)")
    if args.nnodes < 1 or args.nproc_per_node < 1:
        p.error("--nnodes and --nproc-per-node must be at least 1")
    return launch(args.nproc_per_node, args.stage_argv, args.device, args.nnodes, args.rdzv_endpoint)


if __name__ == "__main__":
    sys.exit(main())
