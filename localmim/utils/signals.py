"""The signals and exit status a training stage and its launcher agree on (``runtime/preempt.py`` acts on them in
the ranks, ``utils/launch.py`` passes them on and maps the exit status)."""

import signal

RESUBMIT_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, a checkpoint was written; run again to resume
WARNING_SIGNAL = signal.SIGURG  # what the SLURM profile asks for before the time limit (runtime/preempt.py)
STOP_SIGNALS = (signal.SIGURG, signal.SIGUSR1, signal.SIGTERM)
