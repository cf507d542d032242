"""Sharing a pipeline's results with a team, as README "Share results with a team" says, with the real tools.

One origin repository runs the DAG up to pretraining (tiny params), commits what `git status` shows, pushes the git
history to a bare repository and the data to local-folder DVC remotes: ``team`` (everything) and ``partial`` (all
but ``import_encoder``'s output, as if nobody pushed it). Teammates clone and ``localmim pull``. The expected plans
are derived independently: from ``dvc.yaml``'s deps/outs (``_downstream``) and from what each scenario changed.
MLflow is off here (``LOCALMIM_TRACKING=0``): the runs are not what travels through git and DVC. Slow: ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import BIN, cli_env, copy_repo
from tests.test_pipeline import _downstream, _dvc, _dvc_status, _git, _planned_smk, _smk, _tiny_params

pytestmark = pytest.mark.slow

NOT_PUSHED = "import_encoder"  # the stage whose outputs the `partial` remote lacks
# On top of test_pipeline's TINY: no loader or shard worker processes (each one imports torch again), no kNN monitor
FASTER = {"pretrain": {"num_workers": 0, "knn_every": 0}, "shard": {"workers": 1}}


def _localmim(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "localmim"), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


def _planned(out: str) -> set[str]:
    return set() if "Nothing to be done" in out else _planned_smk(out) - {"all"}


def _reasons(out: str) -> dict[str, str]:
    """Rule -> the reason line of its block in a dry run."""
    return dict(re.findall(r"^(?:local)?rule (\w+):\n(?:    (?!reason).*\n)*    reason: (.*)$", out, flags=re.M))


def _stages(repo: Path, name: str) -> dict:
    return yaml.safe_load((repo / name).read_text())["stages"]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The origin after its run and pushes; ``stale``: a branch whose params.yaml changed ``shard`` after the run."""
    base = tmp_path_factory.mktemp("share")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALMIM_TRACKING", "0")
        origin = copy_repo(base / "origin")
        tree = _tiny_params(origin)
        for section, values in FASTER.items():
            tree[section].update(values)
        (origin / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        _git(origin, "init", "-q", "-b", "main")
        _git(origin, "add", "-A")
        _git(origin, "commit", "-qm", "init")
        _smk(origin, "data/pretrain")
        status = _git(origin, "status", "--porcelain", "--untracked-files=all")
        # README's commands: a DVC remote, commit what git shows, push both
        _dvc(origin, "remote", "add", "-d", "team", str(base / "dvc-remote"))
        _dvc(origin, "remote", "add", "partial", str(base / "dvc-partial"))
        _git(origin, "init", "-q", "--bare", "-b", "main", str(base / "origin.git"))
        _git(origin, "remote", "add", "origin", str(base / "origin.git"))
        _git(origin, "add", "-A")
        _git(origin, "commit", "-qm", "results up to pretraining")
        _git(origin, "push", "-q", "origin", "main")
        _dvc(origin, "push", "-q")
        _dvc(origin, "push", "-q", "-r", "partial", *(set(_stages(origin, "dvc.lock")) - {NOT_PUSHED}))
        _git(origin, "checkout", "-q", "-b", "stale")
        params = (origin / "params.yaml").read_text()
        assert "max_samples_per_shard: 16" in params
        (origin / "params.yaml").write_text(params.replace("max_samples_per_shard: 16", "max_samples_per_shard: 5"))
        _git(origin, "commit", "-qam", "shard param changed, not rerun")
        _git(origin, "push", "-q", "origin", "stale")
        _git(origin, "checkout", "-q", "main")
        yield SimpleNamespace(base=base, origin=origin, bare=base / "origin.git", status=status)


@pytest.fixture(scope="module")
def clone(team):
    """A teammate's clone of main after `localmim pull`."""
    c = team.base / "clone"
    _git(team.base, "clone", "-q", str(team.bare), str(c))
    p = _localmim(c, "pull")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    team.base.joinpath("clone-pull.log").write_text(p.stdout + p.stderr)
    return c


def test_git_status_after_a_run_shows_exactly_what_to_commit(team):
    """dvc.lock and the git-tracked (``cache: false``) metrics and plots of the stages that ran, nothing else."""
    dvc_yaml = _stages(team.origin, "dvc.yaml")
    ran = _stages(team.origin, "dvc.lock")
    declared = [next(iter(o)) for s in ran for o in dvc_yaml[s].get("metrics", []) + dvc_yaml[s].get("plots", [])
                if isinstance(o, dict) and not next(iter(o.values())).get("cache", True)]
    # Snakemake's mark of a directory output's time is not part of it (.dvcignore): not to be committed either
    files = {str(f.relative_to(team.origin)) for d in declared for f in [team.origin / d, *(team.origin / d).rglob("*")]
             if f.is_file() and f.name != ".snakemake_timestamp"}
    shown = {line[3:] for line in team.status.splitlines()}
    assert shown == {"dvc.lock", *files} and "metrics/pretrain.json" in files
    assert all(line.startswith("??") for line in team.status.splitlines())


def test_pulled_clone_plans_nothing_that_dvc_restored(team, clone):
    """After clone + pull: Snakemake plans only the stages never run (not in dvc.lock), DVC lists only the always
    changed manifests; one changed param then plans exactly that stage and what follows in both tools."""
    locked = set(_stages(clone, "dvc.lock"))
    assert "pretrain" in locked and "finetune" not in locked
    pulled = (team.base / "clone-pull.log").read_text()
    recorded = re.search(r"recorded for Snakemake \(.*\): (.*)", pulled).group(1).split(", ")
    assert set(recorded) == locked and "not restored" not in pulled
    assert _planned(_smk(clone, "-n")) == set(_stages(clone, "dvc.yaml")) - locked
    assert _dvc_status(clone, *locked) == {}
    assert _git(clone, "status", "--porcelain") == ""

    params = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(params.replace("mask_ratio: 0.75", "mask_ratio: 0.6", 1))
    try:
        out = _smk(clone, "-n", "data/pretrain")
        dvc_changed = set(_dvc_status(clone, *locked))
    finally:
        (clone / "params.yaml").write_text(params)
    assert dvc_changed == {"pretrain"}
    assert _planned(out) == _downstream({"stages": _stages(clone, "dvc.yaml")}, dvc_changed) & locked == {"pretrain"}
    assert _reasons(out)["pretrain"].startswith("Params have changed")


def test_stale_params_and_unpushed_outputs_rerun_in_both_tools(team):
    """Safety: params changed since dvc.lock (``shard``) and outputs missing from the remote (``import_encoder``)
    are not marked done: Snakemake plans what DVC reports changed and everything downstream, for those reasons."""
    c = team.base / "clone-stale"
    _git(team.base, "clone", "-q", "-b", "stale", str(team.bare), str(c))
    p = _localmim(c, "pull", "-r", "partial")
    assert p.returncode == 1 and "did not restore everything" in p.stderr  # DVC's own failure, passed on
    assert f"{NOT_PUSHED}: not restored (DVC: changed outs" in p.stdout
    assert "shard_train: params changed since dvc.lock (shard.max_samples_per_shard)" in p.stdout
    assert not (c / "data/imported").exists() and (c / "data/pretrain/encoder.pt").is_file()

    locked = set(_stages(c, "dvc.lock"))
    dvc_changed = set(_dvc_status(c, *locked))
    # the stale and the unrestored stages, and pretrain, which reads the missing data/imported
    assert dvc_changed == {"shard_train", "shard_val", NOT_PUSHED, "pretrain"}
    out = _smk(c, "-n", "data/pretrain")
    assert _planned(out) == _downstream({"stages": _stages(c, "dvc.yaml")}, dvc_changed) & locked
    assert _planned(out) == {"shard_train", "shard_val", NOT_PUSHED, "targets", "pretrain"}
    reasons = _reasons(out)
    assert reasons["shard_train"].startswith("Params have changed") and "'max_samples_per_shard': 16" in reasons[
        "shard_train"]
    assert reasons[NOT_PUSHED].startswith("Missing output files")


def _exp_show(repo: Path) -> dict[str, dict]:
    show = json.loads(_dvc(repo, "exp", "show", "--json"))
    return {r["name"]: r["data"] for base in show for e in base.get("experiments") or [] for r in e["revs"]}


@pytest.fixture(scope="module")
def experiment(team, clone) -> dict:
    """`dvc exp run -S` on the origin, `dvc exp push` to the bare repository, `dvc exp pull` into the clone; returns
    the metrics the origin's experiment run wrote."""
    out = _dvc(team.origin, "exp", "run", "-n", "mask06", "-S", "pretrain.mask_ratio=0.6", "pretrain")
    assert "Running stage 'pretrain'" in out
    metrics = json.loads((team.origin / "metrics/pretrain.json").read_text())  # the experiment's own run
    _dvc(team.origin, "exp", "push", "origin", "mask06")
    _dvc(clone, "exp", "pull", "origin", "mask06")
    return metrics


def test_experiments_travel_through_the_git_remote(clone, experiment):
    """`dvc exp show` in the clone lists the experiment with the params and the metrics of the origin's run."""
    exp = _exp_show(clone)["mask06"]
    assert exp["params"]["params.yaml"]["data"]["pretrain"]["mask_ratio"] == 0.6
    assert exp["metrics"]["metrics/pretrain.json"]["data"]["final_loss"] == experiment["final_loss"]
    main = json.loads((clone / "metrics/pretrain.json").read_text())
    assert main["final_loss"] != experiment["final_loss"]  # a result of its own, not the baseline's


def test_compare_and_report_without_mlflow_read_metrics_and_dvc_lock(team, clone, experiment):
    """The clone has no MLflow store: `localmim compare` says so and compares the workspace (dvc.lock params,
    metrics/) with the pulled experiment; `localmim report` names dvc.lock as the source of its numbers."""
    assert not (clone / "mlflow.db").exists()
    p = _localmim(clone, "compare", "--format", "json", "--out", str(team.base / "compare"))
    assert p.returncode == 0, p.stderr
    assert "MLflow has no runs here" in p.stderr and not (clone / "mlflow.db").exists()
    rows = {r["label"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"workspace", "mask06"}
    assert all(set(r["params"]) == {"pretrain.mask_ratio"} for r in rows.values())  # the one param that differs
    assert float(rows["workspace"]["params"]["pretrain.mask_ratio"]) == 0.75
    assert float(rows["mask06"]["params"]["pretrain.mask_ratio"]) == 0.6
    ws = json.loads((clone / "metrics/pretrain.json").read_text())
    assert rows["workspace"]["metrics"]["pretrain.final_loss"] == ws["final_loss"]
    assert rows["mask06"]["metrics"]["pretrain.final_loss"] == experiment["final_loss"]

    r = _localmim(clone, "report")
    assert r.returncode == 0, r.stderr
    assert f"| pretrain | final_loss | {ws['final_loss']:.4g} |" in r.stdout
    assert "1 of 1 metrics files listed in dvc.lock match it" in r.stdout and "MLflow has no runs here" in r.stdout
    lock_md5 = next(o["md5"] for o in _stages(clone, "dvc.lock")["pretrain"]["outs"]
                    if o["path"] == "metrics/pretrain.json")
    assert hashlib.md5((clone / "metrics/pretrain.json").read_bytes()).hexdigest() == lock_md5
