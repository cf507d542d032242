# LocalMIM pipeline: ImageNet ImageFolder -> WebDataset shards -> multi-scale targets -> pretrain -> finetune.
# Every rule runs one `localmim <stage>` command; the rules are generated from the stage registry
# (localmim/stages/dag.py) together with dvc.yaml, so the two cannot drift (`localmim dag --check`).
# Run: `snakemake --cores 2` (the default workflow profile, profiles/default -> workflow/profiles/default,
# sets rerun triggers without mtime: rules rerun when their params, inputs or command change).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.json")


include: "workflow/rules/stages.smk"


rule all:
    input:
        ALL_TARGETS,
    default_target: True
