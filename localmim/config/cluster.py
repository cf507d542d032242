"""Params of the cluster launch (``snakemake --profile workflow/profiles/slurm``): SLURM resources per rule.

Read only by the generated Snakemake rules (``resources:``), never by a stage and never a DVC param, so changing
it never reruns anything. GPUs are not set here: a training rule asks for ``<stage>.nproc_per_node`` GPUs (none
when its ``device`` is ``cpu``; per node, on ``pretrain.nnodes`` nodes) and goes to ``gpu_partition``; every other
rule goes to ``cpu_partition``. A key missing in ``rules.<rule>`` comes from ``default`` (``cluster_resource`` in
workflow/rules/common.smk).
"""

from localmim.config import register_section
from localmim.config.base import NonNegInt, PosInt, Section


class RuleResources(Section):
    cpus: PosInt = 2  # CPUs of the job (--cpus-per-task; one task, torchrun starts the ranks inside it)
    mem_mb: PosInt = 4000  # memory of the job in MiB (--mem)
    runtime: PosInt = 60  # wall time in minutes (-t)
    # training rules (torchrun launcher): SLURM sends SIGURG this many seconds before the time limit
    # (--signal=URG@N); the run checkpoints at its next optimizer step and exits 75, and the profile's `retries`
    # resubmit it to resume. 0 = no signal (the job is killed at the limit; its last periodic checkpoint remains).
    # Must be below runtime x 60 (checked when Snakemake builds the training rule's job)
    stop_seconds: NonNegInt = 300


@register_section("cluster")
class ClusterConfig(Section):
    cpu_partition: str = ""  # SLURM partition of the data rules; "" = the cluster's default partition
    gpu_partition: str = ""  # SLURM partition of the training rules (GPU nodes); "" = the default partition
    default: RuleResources = RuleResources()
    rules: dict[str, RuleResources] = {}  # per rule name (e.g. pretrain); missing rules / keys use ``default``
