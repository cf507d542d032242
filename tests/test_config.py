"""Params loading, overrides and validation: every bad input gives one line naming the key."""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml

from localmim.config import ParamsError, all_sections, apply_overrides, read_params_file, validate_all
from localmim.config.base import load_section, parse_override
from localmim.config.shard import ShardConfig
from tests.conftest import ROOT, run_cli


def test_parse_override_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override("a.b=true") == (["a", "b"], True)
    with pytest.raises(ParamsError, match="expected key.path=value"):
        parse_override("a.b")
    with pytest.raises(ParamsError, match="empty component"):
        parse_override("a..b=1")


def test_apply_overrides_does_not_mutate_and_nests():
    tree = {"shard": {"seed": 0}}
    out = apply_overrides(tree, ["shard.seed=5", "new.key.deep=1"])
    assert tree == {"shard": {"seed": 0}}
    assert out == {"shard": {"seed": 5}, "new": {"key": {"deep": 1}}}
    with pytest.raises(ParamsError, match="shard.seed is a value"):
        apply_overrides(tree, ["shard.seed.x=1"])


def test_repo_params_validate_every_section():
    tree = read_params_file(ROOT / "params.yaml")
    sections = validate_all(tree, source="params.yaml")
    assert set(sections) == set(all_sections()) == set(tree)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("shard.bogus=1", "shard.bogus: unknown key"),
        ("shard.on_bad=maybe", "shard.on_bad: Input should be 'skip' or 'fail'"),
        ("shard.max_samples_per_shard=0", "shard.max_samples_per_shard: Input should be greater than or equal to 1"),
        ("shard.workers=two", "shard.workers: Input should be a valid integer"),
        ("synth.min_side=200", "min_side (200) must be <= max_side"),
        ("synth.dense_min_side=200", "dense_min_side (200) must be <= dense_max_side"),
        ("bogus_section.x=1", "bogus_section: unknown section"),
    ],
)
def test_bad_params_name_the_key(tmp_path, override, needle):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(ParamsError) as e:
        validate_all(apply_overrides(read_params_file(p), [override]), source=str(p))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_load_section_and_file_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"shard": {"seed": 3}}))
    cfg = load_section("shard", ShardConfig, p, ["shard.workers=1"])
    assert (cfg.seed, cfg.workers, cfg.on_bad) == (3, 1, "skip")
    with pytest.raises(ParamsError, match="params file not found"):
        load_section("shard", ShardConfig, tmp_path / "missing.yaml")
    p.write_text("shard: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        read_params_file(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        read_params_file(p)


def test_cli_params_exit_codes(tmp_path):
    ok = run_cli("params")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("params", "--set", "shard.on_bad=maybe")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "shard.on_bad" in lines[0]
    shown = run_cli("params", "--show", "--set", "shard.seed=7")
    assert yaml.safe_load(shown.stdout)["shard"]["seed"] == 7


def test_every_command_has_help():
    import argparse

    from localmim.cli import build_parser

    top = run_cli("--help")  # the installed entry point, once
    assert top.returncode == 0
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = list(sub.choices)
    assert {"params", "dag", "report"} <= set(commands)
    assert all(c in top.stdout for c in commands)
    for c in commands:  # in process: the CLI is this one parser (a subprocess each cost a minute of torch imports)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            parser.parse_args([c, "--help"])
        assert e.value.code == 0 and "usage:" in out.getvalue(), c


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate_and_build_their_model(preset):
    import torch

    from localmim.models import create

    sections = validate_all(read_params_file(preset), source=str(preset))
    pre = sections["pretrain"]
    with torch.device("meta"):
        model = create(pre.model, img_size=pre.input_size)
    assert model.img_size in (pre.input_size, (pre.input_size, pre.input_size))
