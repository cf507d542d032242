"""The generated DAG files and their helpers: one node set for every params file, the conda env mirrors the
pins, Snakemake lint, the torchrun launcher's last line, the targets placeholder, and what DVC records."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import BIN, ROOT, cli_env, run_cli


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_dag_has_the_targets_node_and_pretrain_reads_through_it():
    stages = _dvc_yaml()["stages"]
    assert {"synth", "shard_train", "shard_val", "targets", "pretrain", "finetune", "linprobe"} <= set(stages)
    assert "data/views" in stages["pretrain"]["deps"] and "data/views" in stages["targets"]["outs"]
    assert "pretrain.data" in stages["targets"]["params"]
    # metrics are git-tracked (an experiment commit carries them) and not git-ignored
    for st in stages.values():
        for m in st.get("metrics", []):
            (path, opts), = m.items()
            assert opts == {"cache": False}
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
            assert not ignored, f"{path} is git-ignored: experiments would lose it"


def test_datasets_enter_the_dag_only_as_manifests():
    """Real datasets are read where they are: no stage depends on or outputs a dataset folder, the stages reading a
    dataset depend on its manifest (and take the root from it), and the manifest stages run on every `dvc repro`."""
    stages = _dvc_yaml()["stages"]
    for name in ("imagenet", "ade20k", "coco"):
        st = stages[f"dataset_{name}"]
        assert st["always_changed"] is True and {f"datasets.{name}", "datasets.fingerprint"} == set(st["params"])
        assert st["outs"] == [f"data/raw/{name}.json", f"data/raw/{name}.files.tsv.gz"]
    readers = {"shard_train": "imagenet", "shard_val": "imagenet", "segment": "ade20k", "detect": "coco"}
    for stage, name in readers.items():
        assert f"data/raw/{name}.json" in stages[stage]["deps"]
        assert f"data/raw/{name}.json" in stages[stage]["cmd"]
    embedded_readers = {s for s, st in stages.items() for d in st.get("deps", []) if d in {
        "data/raw/imagenet", "data/raw/ade20k", "data/raw/coco"}}  # fmt: skip
    assert embedded_readers == {"dataset_imagenet", "dataset_ade20k", "dataset_coco"}
    smk = (ROOT / "workflow/rules/stages.smk").read_text()
    assert smk.count("state=lambda wildcards: dataset_state(") == 3


def test_missing_dataset_stops_snakemake_before_any_job(repo_copy):
    p = subprocess.run([str(BIN / "snakemake"), "-n", "--config", "datasets={coco: /nonexistent/coco}"],
                       cwd=repo_copy, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "datasets.coco: /nonexistent/coco: not a directory (expected the folder holding train2017/" in out


def test_conda_env_mirrors_the_pinned_stack():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "workflow/envs/localmim.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps) and all("==" in p for p in pip)
    assert "python=3.11" in env["dependencies"]
    smk = (ROOT / "workflow/rules/stages.smk").read_text()
    assert smk.count('conda: "../envs/localmim.yaml"') == smk.count("\nrule ") == len(_dvc_yaml()["stages"])
    assert smk.count("    log: ") == smk.count("\nrule ")


def test_snakemake_lint_is_clean():
    p = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Congratulations, your workflow is in a good condition" in p.stdout + p.stderr


def test_failing_stage_under_the_dags_torchrun_prints_its_error_last(tmp_path):
    """The pretrain command of dvc.yaml (torchrun launch) with missing shards: the stage's line ends stderr."""
    cmd = _dvc_yaml()["stages"]["pretrain"]["cmd"].replace("${pretrain.nproc_per_node}", "1")
    cmd = cmd.replace("${pretrain.nnodes}", "1")
    cmd = cmd.replace("${pretrain.device}", "cpu") + f" --shards {tmp_path / 'missing'} --device cpu --no-progress"
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    p = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=cli_env(LOCALMIM_TRACKING="0", PYTHONPATH=str(ROOT)))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("localmim pretrain: error: ") and "missing" in last, p.stderr[-3000:]
    assert "ChildFailedError" not in p.stderr and "Traceback" not in p.stderr


def test_launcher_refuses_more_processes_than_given_gpus():
    p = subprocess.run([sys.executable, "-m", "localmim.utils.launch", "--nproc-per-node", "4", "pretrain"],
                       cwd=ROOT, env=cli_env(CUDA_VISIBLE_DEVICES="0,1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "4 processes" in p.stderr and "2 GPU(s)" in p.stderr


def test_targets_placeholder_is_constant_while_pretraining_is_online(tmp_path):
    """In online mode the targets node writes the same bytes whatever its params: DVC does not rerun pretrain."""
    contents = []
    for views in (2, 5):
        out = tmp_path / f"views{views}"
        run_cli("targets", str(tmp_path / "no-shards"), str(out), "--placeholder-unless-views", "--views", str(views),
                cwd=ROOT, check=True, LOCALMIM_TRACKING="0")
        contents.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert contents[0] == contents[1] and list(contents[0]) == ["PLACEHOLDER.json"]


def test_dvc_sync_records_only_stages_whose_params_match(tmp_path, monkeypatch):
    from localmim.pipeline.dvc_sync import plan

    monkeypatch.chdir(tmp_path)
    Path("out_a").mkdir()
    Path("out_b").mkdir()
    stages = {"a": {"params": ["pretrain"], "outs": ["out_a"]},
              "b": {"params": ["finetune"], "outs": ["out_b"]},
              "c": {"params": ["linprobe"], "outs": ["out_c"]}}
    ws = {"pretrain": {"mask_ratio": 0.75}}
    smk = {"pretrain": {"mask_ratio": 0.6}, "finetune": {"epochs": 10}}  # finetune.epochs 10 is the default
    record, skipped = plan(stages, ["a", "b", "c", "all"], smk, ws)
    assert record == ["b"]
    assert "pretrain" in skipped["a"] and "out_c" in skipped["c"]


def test_slurm_profile_dry_run_plans_gpu_jobs(repo_copy):
    """`--profile workflow/profiles/slurm -n` (combined with the default workflow profile, which must not cap GPUs;
    tests/test_pipeline.py runs `--workflow-profile`): the SLURM executor plugin loads and training rules ask for
    GPUs (<stage>.nproc_per_node) while the data rules ask for none."""
    p = subprocess.run([str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm", "-n", "-F"],
                       cwd=repo_copy, env=cli_env(), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    resources = dict(re.findall(r"rule (\w+):.*?\n\s+resources: ([^\n]*)", out, flags=re.S))
    torchrun_rules = {"pretrain", "finetune", "segment", "detect"}
    assert {"synth", "shard_train"} | torchrun_rules <= set(resources)
    tree = yaml.safe_load((repo_copy / "params.yaml").read_text())
    for rule, res in resources.items():
        gpu = re.search(r"\bgpu=(\d+)", res)
        if rule in torchrun_rules:
            assert gpu and int(gpu.group(1)) == tree[rule]["nproc_per_node"], res
        elif rule in ("linprobe", "analyze"):  # one process: feature passes on one GPU
            assert gpu and int(gpu.group(1)) == 1, res
        else:
            assert gpu is None, res
        # the warning before the time limit: training rules only (cluster.default.stop_seconds)
        assert ("slurm_extra=--signal=URG@300" in res) == (rule in torchrun_rules), res


def test_slurm_profile_plans_a_multi_node_pretraining_job_and_checks_the_warning(repo_copy):
    """`pretrain.nnodes: 2` with 4 GPUs per node: the job asks for 2 nodes, one task each (the executor's `mpi`, so
    its job step does not wrap the rule in `srun -n1`: the launcher runs srun) and 4 GPUs per node (GRES: `--gpus`
    would count the job's total); the launcher gets `--nnodes 2`. A warning that would come before the job starts
    is refused, naming the key."""
    base = [str(BIN / "snakemake"), "--profile", "workflow/profiles/slurm", "-n", "-F", "data/pretrain"]
    p = subprocess.run([*base, "--config", "pretrain={nnodes: 2, nproc_per_node: 4, batch_size: 4}"], cwd=repo_copy,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    res = re.search(r"rule pretrain:.*?\n\s+resources: ([^\n]*)", out, flags=re.S).group(1)
    assert {"gpu=0", "gres=gpu:4", "nodes=2", "mpi=srun", "tasks=2", "nproc=4"} <= set(res.split(", ")), res
    assert "--nproc-per-node 4 --device auto --nnodes 2 pretrain" in out
    p = subprocess.run([*base, "--config", "cluster={rules: {pretrain: {runtime: 2, stop_seconds: 120}}}"],
                       cwd=repo_copy, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "cluster.rules.pretrain.stop_seconds (or cluster.default.stop_seconds) = 120 is not before the end of the " \
           "job's runtime (2 minutes)" in p.stdout + p.stderr


def test_nodes_declare_the_paths_their_commands_write():
    """Each node's command, parsed by the real CLI (flags it leaves out take their defaults): its output directory,
    metrics file and curves are the node's declared outs / metrics / plots, and the encoder it reads a dep, so a
    path the DAG declares and the flag default a stage uses cannot drift apart."""
    import shlex

    from localmim.cli import build_parser
    from localmim.pipeline.dag import pipeline

    parser = build_parser()
    for node in pipeline():
        if not node.params:  # the summary is not a stage
            continue
        args = vars(parser.parse_args(shlex.split(node.cmd)[1:]))
        out = args.get("out")
        assert any(o == out or o.startswith(f"{out}/") for o in node.outs), (node.name, out, node.outs)
        if args.get("metrics"):
            assert node.metrics == [args["metrics"]], (node.name, args["metrics"])
            curves = f"metrics/curves/{node.name}"  # where the runner writes a stage's curves
            assert curves in node.plots or not any("curves" in p for p in node.plots), (node.name, node.plots)
        if args.get("encoder"):
            assert args["encoder"] in node.deps, (node.name, args["encoder"])
        if args.get("ckpt_dir"):
            assert args["ckpt_dir"] == f"data/checkpoints/{node.name}", (node.name, args["ckpt_dir"])
