"""The stage runner's error translation (pipeline/stage.py ``execute``): what a stage raises for bad input ends the
command with one line naming the stage, exit 1, without a traceback, also when the error comes out of a DataLoader
worker; a bug (any other exception) is not hidden. Stage modules do not wrap errors themselves."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from localmim.config.synth import SynthConfig
from localmim.pipeline import stage as base
from tests.conftest import ROOT


class _BadImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        from localmim.data.raw.imagefile import ImageFileError

        raise ImageFileError.of("/data/ade/img_0001.jpg", "not an image: cannot identify image file")


def _raise(what: str, tmp) -> None:
    from localmim.data.raw.datasets import DatasetError
    from localmim.models.artifact import load_model
    from localmim.train.engine import NonFiniteLossError

    if what == "dataset":
        raise DatasetError("datasets.coco: /data/coco: missing train2017/")
    if what == "file":
        open(tmp / "nowhere.json")  # noqa: SIM115
    if what == "loss":
        raise NonFiniteLossError("finetune: non-finite loss at step 3 (epoch 0)")
    if what == "worker":
        next(iter(torch.utils.data.DataLoader(_BadImages(), num_workers=1)))
    if what == "model":
        load_model(tmp / "no-model")
    if what == "stage":
        raise base.StageError("data/x: no usable train images")
    raise RuntimeError("a bug")


@pytest.fixture
def boom(tmp_path, monkeypatch):
    """A stage ``boom`` (on the synth section) raising what ``--what`` names; runs it through ``execute``."""
    monkeypatch.setenv("LOCALMIM_TRACKING", "0")
    base.stage("boom", section="synth", config=SynthConfig, help="raise",
               flags=[base.flag("--what")])(lambda cfg, ctx: _raise(ctx.args.what, tmp_path))
    sd = base.STAGES.pop("boom")  # not left in the registry for other tests
    p = argparse.ArgumentParser()
    base.build_parser(p, sd)
    return lambda what: base.execute(sd, p.parse_args(["--what", what, "--params", str(ROOT / "params.yaml")]))


@pytest.mark.parametrize("what,line", [
    ("dataset", "datasets.coco: /data/coco: missing train2017/"),
    ("file", "[Errno 2] No such file or directory: '{tmp}/nowhere.json'"),
    ("loss", "finetune: non-finite loss at step 3 (epoch 0)"),
    ("worker", "/data/ade/img_0001.jpg: not an image: cannot identify image file"),  # not the worker's traceback
    ("model", "{tmp}/no-model: no model.json (not a saved model"),
    ("stage", "data/x: no usable train images"),
])
def test_known_errors_end_in_one_line_naming_the_stage(boom, capsys, tmp_path, what, line):
    assert boom(what) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("localmim boom: error: " + line.format(tmp=tmp_path)), err[-1]
    assert not any("Traceback" in e for e in err)


def test_a_bug_keeps_its_traceback(boom):
    with pytest.raises(RuntimeError, match="a bug"):
        boom("bug")


def test_stage_modules_leave_error_translation_to_the_runner():
    """No stage module turns an exception into a StageError by its message alone (the runner does that)."""
    wrapped = [p.name for p in (ROOT / "localmim" / "stages").glob("*.py")
               if re.search(r"raise StageError\((str\(e\)|f\"\w+: \{e\}\")\)", p.read_text())]
    assert wrapped == []
