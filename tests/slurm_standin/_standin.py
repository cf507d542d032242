"""Shared by the stand-in SLURM commands (sbatch, srun, sacct, scontrol): the state directory
``$STANDIN_SLURM_STATE``, host lists, process trees (what a SLURM step's cgroup holds) and time limits.

The stand-in's own settings are named ``STANDIN_SLURM_*``, not ``SLURM_*``: the SLURM executor's job step removes
``SLURM_*`` variables (but the job id) from the environment of what it starts.

State, per job id: ``<id>.args`` (sbatch's arguments, one a line), ``<id>.out`` (the log when no --output),
``<id>.steps`` (root pid of every task srun started in the job, one a line), ``<id>.srun`` (srun's arguments, a
call a line), ``<id>.signals`` (what the stand-in slurmctld sent: ``<seconds after start> <SIGNAL>
<steps|batch|all>``), ``<id>.rc`` and ``<id>.state`` (COMPLETED, FAILED or TIMEOUT; no file: RUNNING).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path


def state_dir() -> Path:
    d = os.environ.get("STANDIN_SLURM_STATE")
    if not d:
        raise SystemExit("slurm stand-in: STANDIN_SLURM_STATE (the state directory) is not set")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def seconds_per_minute() -> float:
    """A SLURM minute in the stand-in's seconds (``STANDIN_SLURM_SECONDS_PER_MINUTE``, default 60: real time)."""
    return float(os.environ.get("STANDIN_SLURM_SECONDS_PER_MINUTE", "60"))


def scaled(seconds: float) -> float:
    """SLURM seconds -> stand-in seconds."""
    return seconds * seconds_per_minute() / 60


def time_limit_minutes(text: str) -> float:
    """sbatch ``-t``: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> minutes."""
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return float(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


def expand_hostlist(text: str) -> list[str]:
    """``127.0.0.[1-3,5]`` -> 127.0.0.1, 127.0.0.2, 127.0.0.3, 127.0.0.5 (comma-separated items; zero padding kept)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", text):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", item)
        if not item:
            continue
        if not m:
            hosts.append(item)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{m.group(1)}{str(i).zfill(len(lo))}{m.group(3)}")
    return hosts


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process (zombies, dead but not yet reaped, left out)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            out[int(stat.parent.name)] = int(fields[1])
    return out


def tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants now: the processes a SLURM step's cgroup would hold."""
    parents, found = _parents(), [r for r in roots]
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.append(pid)
                grew = True
    return [p for p in found if p in parents]


def send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def step_roots(job: str) -> list[int]:
    f = state_dir() / f"{job}.steps"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


def signal_number(name: str) -> int:
    name = name.strip().upper()
    return int(name) if name.isdigit() else int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


SBATCH_VALUED = {"-A", "-p", "-t", "-D", "-o", "-e", "-J", "-n", "-N", "-c", "-C", "--job-name", "--output", "--error",
                 "--comment", "--mem", "--mem-per-cpu", "--time", "--partition", "--account"}


def parse_sbatch(argv: list[str]) -> dict[str, str]:
    """sbatch's options (``--k=v``, ``--k v`` / ``-k v`` for the options that take a value, flags -> "")."""
    opts, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            opts[k] = v
        elif a in SBATCH_VALUED and i + 1 < len(argv):
            opts[a] = argv[i + 1]
            i += 1
        else:
            opts[a] = ""
        i += 1
    return opts


def job_nodes(job: str) -> int:
    opts = parse_sbatch((state_dir() / f"{job}.args").read_text().splitlines())
    return int(opts.get("--nodes") or opts.get("-N") or 1)


def job_nodelist(job: str) -> str:
    """The stand-in's nodes of a job: 127.0.0.1 .. 127.0.0.N (loopback addresses: all this machine)."""
    n = job_nodes(job)
    return "127.0.0.1" if n == 1 else f"127.0.0.[1-{n}]"


def job_cpus_per_task(job: str) -> int:
    opts = parse_sbatch((state_dir() / f"{job}.args").read_text().splitlines())
    return int(opts.get("--cpus-per-task") or opts.get("-c") or 1)
