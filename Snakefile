# LocalMIM pipeline: ImageNet ImageFolder -> WebDataset shards -> multi-scale targets -> pretrain -> finetune.
# Every rule runs one `localmim <stage>` command; the rules are generated from the stage registry
# (localmim/pipeline/dag.py) together with dvc.yaml, so the two cannot drift (`localmim dag --check`).
# Run: `snakemake --cores 2` (the default workflow profile, profiles/default -> workflow/profiles/default,
# sets rerun triggers without mtime: rules rerun when their params, inputs or command change, or an input directory
# is newer than their outputs; after `git clone` + `dvc pull`, `localmim pull` records the restored stages).
# `--configfile FILE` / `--config KEY=VALUE` change what the stages compute: every command gets exactly the config
# Snakemake sees (each rule's params, written to .snakemake/localmim/params-<hash>.yaml and passed with --params).
# After a successful run, the stages of this run whose params equal params.yaml are recorded in DVC (`dvc commit`)
# so that `dvc status` is clean and `dvc exp run` reruns only what a change affects (docs/reproducing.md).
import json
import os
import subprocess

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"


with open(os.path.join(workflow.basedir, "workflow/schemas/params.schema.json")) as f:
    PARAMS_SCHEMA = json.load(f)
coerce_cli_config(config, PARAMS_SCHEMA, PARAMS_SCHEMA["$defs"])
validate(config, "workflow/schemas/params.schema.json")


include: "workflow/rules/stages.smk"


rule all:
    input:
        ALL_TARGETS,
    default_target: True


onsuccess:
    # `snakemake --touch` (e.g. `localmim pull`) produced nothing: recording its outputs in DVC as made from
    # params.yaml would be a claim no run made.
    if workflow.touch:
        return
    rules = sorted({job.rule.name for job in workflow.dag.jobs} - {"all"})
    cmd = ["python", "-m", "localmim.pipeline.dvc_sync", "--params", params_file(config), *rules]
    try:
        subprocess.run(cmd, check=False)
    except OSError as e:
        print(f"localmim: not recorded in DVC ({e})")
