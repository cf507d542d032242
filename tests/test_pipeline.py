"""The real pipeline tools on the embedded data, sharing one working copy: Snakemake, then DVC experiments.

One temp git repository (a copy of this one with tiny params) is built once by a Snakemake run; the tests then
use it in file order: DVC sees the Snakemake run (``dvc status`` clean), ``dvc exp run -S`` reruns only what a
change affects and keeps its metrics, a mode switch needs no regenerated file, and ``--configfile`` / ``--config``
reach the stages. Slow (a few minutes on 2 cores): marked ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, cli_env, copy_repo, run_cli

pytestmark = pytest.mark.slow

# Tiny settings for every stage so the whole DAG runs in about a minute on 2 cores.
TINY = {
    "synth": {"num_classes": 10, "train_per_class": 4, "val_per_class": 2, "seg_train": 4, "seg_val": 2,
              "coco_train": 4, "coco_val": 2, "min_side": 40, "max_side": 72},
    "shard": {"max_samples_per_shard": 16, "workers": 2},
    "targets": {"views": 2, "workers": 1},
    "pretrain": {"epochs": 1, "warmup_epochs": 0, "global_batch": 8, "batch_size": 8, "num_workers": 1, "log_every": 1},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "global_batch": 8, "batch_size": 8, "num_workers": 1},
    "linprobe": {"epochs": 2, "warmup_epochs": 0, "global_batch": 16, "batch_size": 16, "num_workers": 1},
    "segment": {"iters": 4, "warmup_iters": 1, "global_batch": 2, "batch_size": 2, "eval_every": 0, "ckpt_every": 4,
                "num_workers": 1},
    "detect": {"epochs": 1, "image_size": 32, "num_workers": 0, "vis_images": 2},
}  # fmt: skip
GENERATED = ["dvc.yaml", "Snakefile", "workflow"]
# The manifest stages run on every `dvc repro` (DVC cannot see inside a dataset folder without scanning it).
DATASET_STAGES = {"dataset_imagenet", "dataset_ade20k", "dataset_coco"}


def _tiny_params(repo: Path) -> dict:
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY.items():
        if section in tree:
            tree[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return tree


def _run(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=cli_env(LOCALMIM_TEST="1"), capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p.stdout + p.stderr


def _dvc(repo: Path, *args: str) -> str:
    return _run([str(BIN / "dvc"), *args], repo)


def _smk(repo: Path, *args: str) -> str:
    return _run([str(BIN / "snakemake"), "--cores", "2", *args], repo)


def _downstream(dvc_yaml: dict, changed: set[str]) -> set[str]:
    """Stages that must rerun when ``changed`` stages rerun: everything reachable through deps/outs."""
    stages = dvc_yaml["stages"]

    def outs(s):
        return [next(iter(o)) if isinstance(o, dict) else o for o in stages[s].get("outs", []) + stages[s].get(
            "metrics", [])]

    result = set(changed)
    grew = True
    while grew:
        grew = False
        for name, st in stages.items():
            if name in result:
                continue
            deps = st.get("deps", [])
            if any(d == o or d.startswith(o.rstrip("/") + "/") for s in result for o in outs(s) for d in deps):
                result.add(name)
                grew = True
    return result


def _ran_dvc(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def _ran_smk(output: str) -> set[str]:
    return set(re.findall(r"Finished jobid: \d+ \(Rule: ([\w-]+)\)", output)) - {"all"}


def _dvc_status(repo: Path, *targets: str) -> dict:
    """``dvc status --json`` without the manifest stages' "always changed" (their only entry when up to date)."""
    p = subprocess.run([str(BIN / "dvc"), "status", "--json", *targets], cwd=repo, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    status = json.loads(p.stdout)
    assert all(status[s] == ["always changed"] for s in DATASET_STAGES & set(status)), status
    return {k: v for k, v in status.items() if k not in DATASET_STAGES}


def _git(repo: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], repo)


def _last_pretrain_params(repo: Path) -> dict[str, str]:
    """Params of the newest MLflow pretraining run (keys with or without the ``pretrain.`` prefix)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["localmim"], filter_string="tags.stage = 'pretrain'",
                              order_by=["start_time DESC"], output_format="list")
    return {k.removeprefix("pretrain."): v for k, v in runs[0].data.params.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repository (tiny params committed) after one full Snakemake run of the default target."""
    r = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    _tiny_params(r)
    _git(r, "init", "-q")
    _git(r, "add", "-A")
    _git(r, "commit", "-qm", "init")
    r.joinpath("smk_first_run.log").write_text(_smk(r))
    return r


def test_snakemake_run_leaves_dvc_clean(repo):
    out = (repo / "smk_first_run.log").read_text()
    assert "Using workflow specific profile profiles/default" in out
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    assert _ran_smk(out) == set(dvc_yaml["stages"])
    for split in ("train", "val"):
        manifest = yaml.safe_load((repo / f"data/shards/{split}/{split}.json").read_text())
        assert manifest["num_samples"] + manifest["num_skipped"] == manifest["num_found"]
    assert (repo / "logs" / "pretrain.log").read_text().strip()
    # pretrain.data is online: targets wrote its placeholder only, pretraining read the raw shards
    assert not (repo / "data/views/views.json").exists() and (repo / "data/views/PLACEHOLDER.json").is_file()

    # Snakemake has nothing left to do (no mtime trigger) and DVC sees the same working copy as up to date.
    assert "Nothing to be done" in _smk(repo, "-n")
    assert _dvc_status(repo) == {}

    # A shard param change plans the shard stages first, nothing upstream (`--dry` cannot see further: the
    # downstream stages rerun when the new shards differ, as the experiments below show for pretrain).
    params = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(params.replace("max_samples_per_shard: 16", "max_samples_per_shard: 5"))
        planned = _ran_dvc(_dvc(repo, "repro", "--dry"))
    finally:
        (repo / "params.yaml").write_text(params)
    assert planned == {"shard_train", "shard_val"} | DATASET_STAGES


def _lock_outs(repo: Path) -> dict[str, str]:
    """Directory / file output path -> DVC md5, for every stage in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def test_forced_rerun_with_identical_outputs_leaves_dependants_up_to_date(repo):
    """Rerunning the shard and pretraining stages on the same inputs, params and code writes the same bytes: DVC
    must see the same directory hashes (the new lineage files, which name the new MLflow runs, are not hashed),
    so nothing downstream is out of date. At ImageNet scale this is days of pretraining not rerun."""
    before = _lock_outs(repo)
    old_run = json.loads((repo / "data/shards/train/lineage.shard_train.json").read_text())["run_id"]
    out = _dvc(repo, "repro", "--force", "--single-item", "shard_train", "pretrain")
    assert _ran_dvc(out) == {"shard_train", "pretrain"}
    assert json.loads((repo / "data/shards/train/lineage.shard_train.json").read_text())["run_id"] != old_run
    after = _lock_outs(repo)
    for path in ("data/shards/train", "data/pretrain"):
        assert after[path] == before[path], f"{path}: rerun with identical inputs changed its DVC hash"
    assert _dvc_status(repo) == {}


def test_dvc_exp_run_reruns_only_downstream_and_keeps_metrics(repo):
    """A param of one stage reruns that stage and what depends on it, nothing upstream (pretraining's param change
    is the same rule: test_forced_rerun above and test_mode_switch below run it). linprobe: the cheapest stage
    with a headline metric."""
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    out = _dvc(repo, "exp", "run", "-n", "blr02", "-S", "linprobe.blr=0.2")
    assert _ran_dvc(out) - DATASET_STAGES == _downstream(dvc_yaml, {"linprobe"}) == {"linprobe", "summary"}

    show = json.loads(_dvc(repo, "exp", "show", "--json"))
    exps = {r["name"]: r["data"] for base in show for e in base.get("experiments") or [] for r in e["revs"]}
    top1 = exps["blr02"]["metrics"]["metrics/linprobe.json"]["data"]["top1"]
    assert top1 == json.loads((repo / "metrics/linprobe.json").read_text())["top1"]
    assert exps["blr02"]["params"]["params.yaml"]["data"]["linprobe"]["blr"] == 0.2

    # The readable default table (`make exps`): the key params and headline metrics, not every key.
    from localmim.pipeline.dag import KEY_PARAMS, exp_show_args
    from localmim.tracking.metrics import HEADLINE

    header = _dvc(repo, "exp", "show", "--csv", *exp_show_args()).splitlines()[0].split(",")
    assert set(KEY_PARAMS) <= set(header)
    # DVC names a column by its bare key when one metrics file has it, else <file>:<key> (top1: finetune, linprobe)
    assert {"metrics/finetune.json:top1", "mIoU", "bbox_AP50"} <= set(header), header
    # Experiment, Created, the key params and at most one column per stage headline metric (not every key)
    assert len(header) <= 2 + len(KEY_PARAMS) + sum(len(keys) for keys in HEADLINE.values()), header


def test_mode_switch_runs_targets_without_regenerating_files(repo):
    """``pretrain.data=views`` is a param change like any other: the targets node exists in every mode."""
    before = _git(repo, "status", "--porcelain", "--", *GENERATED)
    out = _dvc(repo, "exp", "run", "-n", "views", "-S", "pretrain.data=views", "pretrain")  # up to pretraining
    assert {"targets", "pretrain"} <= _ran_dvc(out) and not {"synth", "shard_train", "shard_val"} & _ran_dvc(out)
    assert json.loads((repo / "data/views/views.json").read_text())["views"] == TINY["targets"]["views"]
    assert _git(repo, "status", "--porcelain", "--", *GENERATED) == before == ""
    _run([sys.executable, "-m", "localmim.cli", "dag", "--check"], repo)  # the copy's registry, not this checkout's

    # Two experiments with metrics: `dvc metrics diff` compares them (this one ran up to pretraining only, so its
    # pretraining metrics are the ones both experiments have).
    p = subprocess.run([str(BIN / "dvc"), "metrics", "diff", "blr02", "views", "--all", "--json"], cwd=repo,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    pre = json.loads(p.stdout)["metrics/pretrain.json"]["final_loss"]
    assert isinstance(pre["old"], float)  # blr02's, from its experiment commit
    assert pre["new"] == pytest.approx(json.loads((repo / "metrics/pretrain.json").read_text())["final_loss"])


def test_snakemake_config_reaches_the_stages(repo):
    """``--configfile`` and ``--config`` change what the commands compute (MLflow and params next to outputs)."""
    ws_params = (repo / "params.yaml").read_bytes()
    tree = yaml.safe_load(ws_params)
    tree["pretrain"].update(mask_ratio=0.55, data="online")
    (repo / "p055.yaml").write_text(yaml.safe_dump(tree))
    out = _smk(repo, "data/pretrain", "--configfile", "p055.yaml")
    assert _ran_smk(out) == {"pretrain"}  # the same values in another key order change nothing else
    assert yaml.safe_load((repo / "data/pretrain/params.yaml").read_text())["pretrain"]["mask_ratio"] == 0.55
    assert float(_last_pretrain_params(repo)["mask_ratio"]) == 0.55
    # params.yaml says otherwise: the run is not recorded in DVC, and DVC says pretrain changed.
    assert re.search(r"pretrain: not recorded in DVC \(Snakemake's config differs from params.yaml", out)
    assert "pretrain" in _dvc(repo, "status", "pretrain")

    # --config, nested values included (Snakemake reads them as strings; the schema types them); views mode.
    out = _smk(repo, "data/pretrain", "--configfile", "p055.yaml",
               "--config", "pretrain={mask_ratio: 0.45, data: views}")
    assert _ran_smk(out) == {"targets", "pretrain"}
    assert (repo / "data/views/views.json").is_file()
    assert yaml.safe_load((repo / "data/pretrain/params.yaml").read_text())["pretrain"]["mask_ratio"] == 0.45
    run = _last_pretrain_params(repo)
    assert float(run["mask_ratio"]) == 0.45 and run["data"] == "views"
    assert (repo / "params.yaml").read_bytes() == ws_params
    assert _git(repo, "status", "--porcelain", "--", *GENERATED) == ""


def test_unreachable_tracking_server_stops_stage_before_work(repo_copy):
    _tiny_params(repo_copy)
    p = run_cli("synth", "data/raw", cwd=repo_copy, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert p.returncode == 1
    assert "http://127.0.0.1:9" in p.stderr and "unreachable" in p.stderr
    assert not (repo_copy / "data" / "raw").exists()


def test_committed_dag_is_current():
    p = run_cli("dag", "--check")
    assert p.returncode == 0, p.stderr


def test_snakemake_report_holds_metrics_plots_and_params(repo, tmp_path):
    import zipfile

    _smk(repo, "--report", str(tmp_path / "report.zip"))
    with zipfile.ZipFile(tmp_path / "report.zip") as z:
        names = z.namelist()
        html = z.read(next(n for n in names if n.endswith("report.html"))).decode()
    assert {"metrics.png", "metrics.tsv", "finetune.json", "pretrain.json"} <= {Path(n).name for n in names}
    png = next(n for n in names if n.endswith("metrics.png"))
    assert zipfile.ZipFile(tmp_path / "report.zip").read(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "'mask_ratio': " in html  # the rules' params


def _sbatch_calls(state: Path) -> dict[str, list[str]]:
    """Rule name -> the sbatch arguments the stand-in recorded for its job."""
    calls = {}
    for f in sorted(state.glob("*.args")):
        args = f.read_text().splitlines()
        calls[args[args.index("--comment") + 1].removeprefix("rule_")] = args
    return calls


def test_slurm_profile_submits_training_jobs_with_their_gpus(repo, tmp_path):
    """The SLURM profile with stand-in sbatch/squeue/sacct/scancel/srun on PATH: every job is submitted with
    the resources from params, training jobs ask for <stage>.nproc_per_node GPUs on the GPU partition, data jobs
    none on the CPU partition, and torchrun runs inside the job on the GPUs it was given."""
    state = tmp_path / "slurm"
    env = cli_env(STANDIN_SLURM_STATE=str(state))
    env["PATH"] = f"{Path(__file__).parent / 'slurm_standin'}:{env['PATH']}"
    cmd = [str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm",
           "--slurm-init-seconds-before-status-checks", "1",
           "--config", "cluster={gpu_partition: gpu, cpu_partition: cpu}",
           "--forcerun", "targets", "pretrain", "--", "data/finetune"]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    calls = _sbatch_calls(state)
    assert set(calls) == {"targets", "pretrain", "finetune"}
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    for rule, args in calls.items():
        section = "finetune" if rule == "finetune" else "pretrain"
        gpus = tree[section]["nproc_per_node"] if rule in ("pretrain", "finetune") else 0
        assert (f"--gpus={gpus}" in args) == (gpus > 0) and any(a.startswith("--gpus") for a in args) == (gpus > 0)
        assert args[args.index("-p") + 1] == ("gpu" if gpus else "cpu")
        res = {**tree["cluster"]["default"], **tree["cluster"]["rules"].get(rule, {})}
        assert args[args.index("--mem") + 1] == str(res["mem_mb"]) and args[args.index("-t") + 1] == str(res["runtime"])
        assert f"--cpus-per-task={res['cpus']}" in args
    assert all((state / f"{f.stem}.rc").read_text().strip() == "0" for f in state.glob("*.args"))
    assert "[default0]:localmim pretrain: loss" in (repo / "logs" / "pretrain.log").read_text()


# ------------------------------------------------------------------------------------ a real dataset by params


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory) -> Path:
    """Dataset folders outside the repository, in the real layouts, with other counts and another seed than the
    embedded data (so that no image of it equals an embedded one)."""
    d = tmp_path_factory.mktemp("datasets")
    sets = ["synth.num_classes=3", "synth.train_per_class=6", "synth.val_per_class=2", "synth.min_side=40",
            "synth.max_side=64", "synth.seg_train=3", "synth.seg_val=2", "synth.coco_train=3", "synth.coco_val=2"]
    args = [a for kv in sets for a in ("--set", kv)]
    run_cli("synth", str(d), "--seed", "7", "--params", str(ROOT / "params.yaml"), *args, cwd=d, check=True,
            LOCALMIM_TRACKING="0")
    return d


def _shard_paths(shards: Path, split: str) -> list[str]:
    """The source path of every sample in the shards of ``split`` (from the samples' json members)."""
    import tarfile

    paths = []
    for tar in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            paths += [json.loads(t.extractfile(m).read())["path"] for m in t if m.name.endswith(".json")]
    return sorted(paths)


def _images(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))


def _planned_smk(output: str) -> set[str]:
    """Rules in the job table of a dry run."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return set(re.findall(r"^(\w+)\s+\d+\s*$", table, flags=re.M))


def _dvc_cache_md5s(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in (repo / ".dvc/cache/files/md5").glob("*/*") if not p.suffix}


def test_real_imagenet_by_params_with_snakemake_and_dvc(repo, real_tree):
    """``datasets.imagenet`` pointing at a folder outside the repository: the shards hold exactly its images and
    pretraining reads them, no file of it enters the DVC cache, a touched file reruns the shards and what follows,
    an unchanged folder reruns nothing, and the empty param brings the embedded data back."""
    imagenet = real_tree / "imagenet"
    cfg = ["--config", f"datasets={{imagenet: {imagenet}}}"]
    out = _smk(repo, *cfg, "--", "data/pretrain")
    assert _ran_smk(out) == {"dataset_imagenet", "shard_train", "shard_val", "targets", "pretrain"}
    for split in ("train", "val"):
        assert _shard_paths(repo / "data/shards" / split, split) == _images(imagenet / split)
    train = yaml.safe_load((repo / "data/shards/train/train.json").read_text())
    assert train["source"] == str(imagenet / "train") and len(train["classes"]) == 3
    assert json.loads((repo / "metrics/pretrain.json").read_text())["steps_per_epoch"] == 18 // 8  # its 18 images
    assert "Nothing to be done" in _smk(repo, "-n", *cfg, "--", "data/pretrain")  # unchanged: nothing reruns

    img = imagenet / "train" / _images(imagenet / "train")[0]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the manifest changes
    planned = _planned_smk(_smk(repo, "-n", *cfg, "--", "data/pretrain"))
    assert planned == {"dataset_imagenet", "shard_train", "shard_val", "targets", "pretrain"}

    # DVC with the path in params.yaml: the touched file reruns the shards, then an unchanged folder nothing.
    ws = (repo / "params.yaml").read_text()
    try:
        tree = yaml.safe_load(ws)
        tree["datasets"]["imagenet"] = str(imagenet)
        (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        assert _ran_dvc(_dvc(repo, "repro", "shard_train", "shard_val")) == {"dataset_imagenet", "shard_train",
                                                                             "shard_val"}  # fmt: skip
        assert _ran_dvc(_dvc(repo, "repro", "shard_train", "shard_val")) == {"dataset_imagenet"}
        assert _dvc_status(repo, "shard_train", "shard_val") == {}
    finally:
        (repo / "params.yaml").write_text(ws)
    cached = _dvc_cache_md5s(repo)
    assert hashlib.md5((repo / "data/raw/imagenet.json").read_bytes()).hexdigest() in cached  # the manifest is
    assert not {hashlib.md5(p.read_bytes()).hexdigest() for p in imagenet.rglob("*") if p.is_file()} & cached

    # Back to the embedded data (the param is empty again in params.yaml): its images are sharded again.
    out = _smk(repo, "data/shards/train", "data/shards/val")
    assert _ran_smk(out) == {"dataset_imagenet", "shard_train", "shard_val"}
    for split in ("train", "val"):
        assert _shard_paths(repo / "data/shards" / split, split) == _images(repo / "data/raw/imagenet" / split)


def test_dag_starts_from_an_imported_encoder(repo):
    """``imported.source`` set: the import node writes the encoder, pretrain copies it without training, and
    fine-tuning runs on it; the same nodes, no file regenerated. The reference-format ViT fixture (16 px).
    Last in the file: the workspace keeps this experiment's params (the tests above need pre-training)."""
    source = "tests/fixtures/reference/localmim_vit.pth"
    out = _dvc(repo, "exp", "run", "-n", "released", "-S", f"imported.source={source}", "-S", "imported.num_heads=2",
               "finetune")  # up to one downstream stage: the others read the same encoder the same way
    ran = _ran_dvc(out)
    assert {"import_encoder", "pretrain", "finetune"} <= ran, out[-3000:]
    assert not {"synth", "shard_train", "shard_val", "linprobe", "segment", "detect"} & ran
    assert "holds an imported encoder: copied" in out
    assert json.loads((repo / "metrics/pretrain.json").read_text()) == {"imported": 1.0}
    info = json.loads((repo / "data/pretrain/encoder.json").read_text())
    assert info["imported"]["file"] == "localmim_vit.pth" and info["timm_name"] == "vit_d16x5_patch4_16"
    assert json.loads((repo / "metrics/finetune.json").read_text())["epochs"] == TINY["finetune"]["epochs"]
    assert _git(repo, "status", "--porcelain", "--", *GENERATED) == ""
