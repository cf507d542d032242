# Helpers of the generated rules (workflow/rules/stages.smk); included by the Snakefile before them.
import hashlib
import os
import sys

import yaml


def params_file(tree):
    """`tree` as a params file named by its content, under .snakemake/localmim/ (written atomically: jobs on
    other nodes may write it too). A rule's command reads it with --params: it sees exactly Snakemake's config."""
    text = yaml.safe_dump(tree, sort_keys=True)
    path = f".snakemake/localmim/params-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def canonical(value):
    """`value` with every mapping's keys sorted: Snakemake compares params by their order too, and a config
    merged from --configfile / --config may list the same keys in another order."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def cluster_resource(rule, key):
    """`cluster.rules.<rule>.<key>`, else `cluster.default.<key>` (params.yaml), else the model default."""
    cluster = config.get("cluster") or {}
    for scope in ((cluster.get("rules") or {}).get(rule) or {}, cluster.get("default") or {}):
        if key in scope:
            return scope[key]
    return CLUSTER_DEFAULTS[key]


def stop_signal(rule):
    """`slurm_extra` of a training rule: `--signal=URG@<stop_seconds>`, SLURM's warning before the time limit (the run
    checkpoints at its next optimizer step and exits 75; the profile's `retries` resubmit it, and it resumes). None
    (no signal) when `stop_seconds` is 0. SIGURG because its default action is to ignore it: SLURM signals every
    process of the job step, Snakemake's and the shell's included (localmim/runtime/preempt.py)."""
    seconds, runtime = cluster_resource(rule, "stop_seconds"), cluster_resource(rule, "runtime")
    if not seconds:
        return None
    if seconds >= 60 * runtime:
        raise ValueError(f"cluster.rules.{rule}.stop_seconds (or cluster.default.stop_seconds) = {seconds} is not "
                         f"before the end of the job's runtime ({runtime} minutes): give less than {60 * runtime}")
    return f"--signal={STOP_SIGNAL}@{seconds}"


def cluster_partition(gpu):
    return (config.get("cluster") or {}).get("gpu_partition" if gpu else "cpu_partition", "")


def _schema_types(schema, defs):
    """The JSON types a schema node allows ("any" when it does not say)."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return set().union(*(_schema_types(s, defs) for s in schema["anyOf"]))
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return {"string" if isinstance(v, str) else "other" for v in values}
    t = schema.get("type", "any")
    return set(t) if isinstance(t, list) else {t}


def coerce_cli_config(node, schema, defs):
    """Snakemake reads nested `--config` values as strings (`--config 'pretrain={mask_ratio: 0.6}'` gives
    "0.6"): parse a string as YAML wherever the params schema does not allow a string there."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(node, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, value in node.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            node[key] = coerce_cli_config(value, sub, defs)
        return node
    if isinstance(node, list):
        items = schema.get("prefixItems") or [schema.get("items", {})] * len(node)
        return [coerce_cli_config(v, s, defs) for v, s in zip(node, items)] + node[len(items):]
    if isinstance(node, str) and not {"string", "any"} & _schema_types(schema, defs):
        return yaml.safe_load(node)
    return node


_DATASET_STATES = {}


def dataset_state(name):
    """Rerun trigger of the dataset_<name> rule: the fingerprint of the folder `datasets.<name>`, from a stat scan
    when the DAG is built (localmim.data.raw.datasets.state; content mode hashes only files not in its cache), or
    "embedded" when the param is empty (then the rule's input, synth's output, decides). Scanned once per process."""
    ds = config.get("datasets") or {}
    root, mode = ds.get(name) or "", ds.get("fingerprint") or "stat"
    if not root:
        return "embedded"
    key = (name, root, mode)
    if key not in _DATASET_STATES:
        if workflow.basedir not in sys.path:  # this checkout's package (as the rules' `python -m localmim.cli`)
            sys.path.insert(0, workflow.basedir)
        from localmim.data.raw.datasets import state

        _DATASET_STATES[key] = state(name, root, mode, outdir="data/raw")
    return _DATASET_STATES[key]
