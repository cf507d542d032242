"""``python -m localmim.utils.launch --nproc-per-node N STAGE ARGS...``: a stage under torchrun, error line last.

The DAG (Snakemake rules and dvc.yaml) launches the training stages through this wrapper instead of calling
``torchrun`` directly. It runs torchrun's own launcher (``torch.distributed.run``) in this process with every
rank's stderr tee'd to a temporary log directory, so that when a rank fails

* torchrun's ``ChildFailedError`` traceback (about twenty lines of launcher frames) is not printed, and
* the stage's own one-line error (``localmim <stage>: error: ...``) is printed again as the very last line,

and the exit code is the failing rank's. Single node by default (``--standalone``); for several nodes set
``LOCALMIM_TORCHRUN_ARGS`` to torchrun's rendezvous options (``--nnodes 2 --rdzv-backend c10d
--rdzv-endpoint HOST:29500 --rdzv-id JOB``) and start the command once per node (``srun``), see
docs/reproducing.md. When the job was given fewer GPUs (``CUDA_VISIBLE_DEVICES``) than processes asked for,
it stops before launching, naming both numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:)?(localmim [\w-]+: error: .*)$")
PROG = "localmim launch"


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


def torchrun_args(nproc: int, log_dir: Path, stage_argv: list[str]) -> list[str]:
    extra = shlex.split(os.environ.get("LOCALMIM_TORCHRUN_ARGS", ""))
    topology = extra if extra else ["--standalone"]
    return [*topology, f"--nproc-per-node={nproc}", "--tee=2", f"--log-dir={log_dir}",
            "-m", "localmim.cli", *stage_argv]


def launch(nproc: int, stage_argv: list[str], device: str | None = None) -> int:
    """Run ``localmim.cli STAGE_ARGV`` under torchrun with ``nproc`` processes; returns the exit code."""
    gpus = visible_gpus()
    if device != "cpu" and gpus is not None and 0 < gpus < nproc:
        print(f"{PROG}: error: {nproc} processes asked for (nproc_per_node) but this job was given {gpus} GPU(s) "
              f"(CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})", file=sys.stderr)
        return 2
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log_dir = Path(tempfile.mkdtemp(prefix="localmim-launch-"))
    try:
        try:
            torchrun.run(torchrun.parse_args(torchrun_args(nproc, log_dir, stage_argv)))
        except ChildFailedError as e:
            rank, failure = min(e.failures.items())
            lines = error_lines(log_dir) or [
                f"{PROG}: error: rank {rank} of `localmim {' '.join(stage_argv[:1])}` exited with code "
                f"{failure.exitcode} (its output is above)"]
            sys.stdout.flush()
            print(lines[0], file=sys.stderr, flush=True)
            return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes (one per GPU) on this node")
    p.add_argument("--device", default=None, help="the stage's device param (cpu skips the GPU count check)")
    p.add_argument("stage_argv", nargs=argparse.REMAINDER, help="localmim STAGE [ARGS...]")
    args = p.parse_args(argv)
    if not args.stage_argv:
        p.error("missing the stage command (e.g. `pretrain --out data/pretrain`)")
    return launch(args.nproc_per_node, args.stage_argv, args.device)


if __name__ == "__main__":
    sys.exit(main())
