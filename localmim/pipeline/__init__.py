"""The pipeline machinery: the stage pattern and registry (``stage``), the DAG declared once (``dag``) and rendered
into dvc.yaml / Snakemake rules / the params schema (``render``), recording Snakemake runs in DVC (``dvc_sync``) and
the results table (``results``). Imports ``tracking``; the stage commands (``localmim.stages``) import this."""
