"""The model-artifact contract (localmim.models.artifact): a classifier, a segmenter and a detector saved with
save_model and loaded by load_model in a fresh process give the original's outputs exactly (CPU); a model rebuilt
without the weights does not; every way a saved model can be wrong is refused with a line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from localmim.models.artifact import ModelArtifactError, load_model, read_card, save_model
from localmim.models.detection import DetectorSpec, build_mask_rcnn
from localmim.models.encoder_io import ClassifierSpec, build_classifier
from localmim.models.segmentation import SegmenterSpec, build_segmenter
from tests.conftest import ROOT, cli_env
from tests.encoders import micro_spec

SEG = SegmenterSpec(num_classes=3, crop_size=32, channels=8, aux_channels=4, drop_path=0.1)
DET = DetectorSpec(num_classes=2, image_size=32, box_head_dim=16, mask_head_channels=8, detections_per_img=10)


def _inputs() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {"classify": torch.rand(2, 3, 32, 32, generator=g),
            "segment": torch.randint(0, 256, (2, 3, 32, 40), generator=g, dtype=torch.uint8),
            "detect": [torch.rand(3, 40, 48, generator=g), torch.rand(3, 32, 32, generator=g)]}


def _outputs(task: str, model: torch.nn.Module, x) -> list[torch.Tensor]:
    """Everything the model returns on ``x`` in eval mode, as a flat tensor list."""
    with torch.no_grad():
        out = model.eval()(x)
    if task == "segment":
        return [out[0]]  # [B, K, H, W] logits (no auxiliary logits in eval)
    if task == "detect":
        return [d[k] for d in out for k in ("boxes", "labels", "scores", "masks")]
    return [out]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Iterator[dict]:
    """The three tiny models (seeded, BatchNorm statistics moved off their defaults), saved, with their outputs
    (one intra-op thread, as the loading process: the same kernels, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    enc = micro_spec("vit")
    torch.manual_seed(0)
    models = {"classify": build_classifier(enc, 3), "segment": build_segmenter(enc, SEG), "detect":
              build_mask_rcnn(enc, DET)}
    models["segment"].train()(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))  # BN running stats
    specs = {"classify": ClassifierSpec.of(enc, 3), "segment": SEG, "detect": DET}
    last = build_classifier(enc, 3)  # another state of the same classifier: other_weights
    for task, model in models.items():
        save_model(root / task, model, specs[task], encoder=None if task == "classify" else enc,
                   info={"task_note": task}, other_weights={"last.pt": last.state_dict()} if task == "classify"
                   else None)
    x = _inputs()
    outs = {t: _outputs(t, m, x[t]) for t, m in models.items()}
    yield {"root": root, "outs": outs, "last": _outputs("classify", last, x["classify"]), "inputs": x}
    torch.set_num_threads(threads)


LOADER = """
import sys
sys.path.insert(0, sys.argv[3])  # this checkout's localmim and tests
import torch
torch.set_num_threads(1)
from localmim.models.artifact import load_model
from tests.test_model_artifact import _outputs
root, inputs = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
outs = {t: _outputs(t, load_model(f"{root}/{t}", task=t)[0], inputs[t]) for t in ("classify", "segment", "detect")}
outs["last"] = _outputs("classify", load_model(f"{root}/classify", weights="last.pt")[0], inputs["classify"])
torch.save(outs, sys.argv[4])
"""


def test_three_models_round_trip_in_a_fresh_process(saved, tmp_path):
    """save_model -> load_model in another Python process: bit-identical outputs on the same inputs."""
    assert len(saved["outs"]["detect"][0]) > 0  # the untrained detector does detect something: a real comparison
    torch.save(saved["inputs"], tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOADER))
    p = subprocess.run([sys.executable, str(script), str(saved["root"]), str(tmp_path / "inputs.pt"), str(ROOT),
                        str(tmp_path / "outs.pt")], env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "outs.pt", weights_only=True)
    for task in ("classify", "segment", "detect", "last"):
        want = saved["last"] if task == "last" else saved["outs"][task]
        assert len(got[task]) == len(want), task
        assert all(torch.equal(a, b) for a, b in zip(got[task], want, strict=True)), task


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_loaded_model_is_the_saved_one_not_a_fresh_build(saved, task):
    """In-process, fresh objects: the loaded model reproduces the outputs, a model built from the card alone (the
    encoder randomly initialised) does not; the spec comes back as written."""
    model, spec = load_model(saved["root"] / task)
    x = _inputs()[task]
    assert all(torch.equal(a, b) for a, b in zip(_outputs(task, model, x), saved["outs"][task], strict=True))
    card = read_card(saved["root"] / task)
    fresh = _outputs(task, card.build(), x)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(fresh, saved["outs"][task], strict=False))
    on_disk = json.loads((saved["root"] / task / "model.json").read_text())
    assert on_disk["format"] == "localmim-model/1" and on_disk["task"] == task == spec.task
    assert on_disk["info"] == {"task_note": task} and type(spec).model_validate(on_disk["spec"]) == spec


def _copy(saved, task: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved["root"] / task, tmp_path / task))


def _edit(d: Path, **changes) -> None:
    card = json.loads((d / "model.json").read_text())
    for k, v in changes.items():
        if v is None:
            card.pop(k, None)
        else:
            card[k] = v
    (d / "model.json").write_text(json.dumps(card))


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(ModelArtifactError, match=rf"{tmp_path / 'nowhere'}: no model.json"):
        load_model(tmp_path / "nowhere")
    d = _copy(saved, "segment", tmp_path)
    (d / "model.pt").unlink()
    with pytest.raises(ModelArtifactError, match=rf"{d / 'model.pt'}: missing"):
        load_model(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(ModelArtifactError, match=rf"{d / 'model.json'}: unreadable"):
        load_model(d)


@pytest.mark.parametrize("changes,message", [
    ({"format": None}, r"format None is not localmim-model/<version>"),  # the schema before this contract
    ({"format": "timm/1"}, r"format 'timm/1' is not localmim-model/<version>"),
    ({"format": "localmim-model/2"}, r"format version 2; this localmim reads version 1"),
    ({"task": "pose"}, r"task 'pose' is not one of classify, segment, detect"),
    ({"spec": {"num_classes": 3, "crop_size": 32, "channels": 8, "aux_channels": 4, "heads": 2}},
     r"spec\.heads: Extra inputs are not permitted"),
    ({"spec": {"num_classes": 0, "crop_size": 32}}, r"spec\.num_classes: Input should be greater than or equal to "
                                                    r"1; spec\.channels: Field required"),
    ({"encoder": None}, r"a segment model needs 'encoder'"),
    ({"weights": "../model.pt"}, r"weights must be file names next to it"),
])
def test_bad_model_json_is_refused(saved, tmp_path, changes, message):
    d = _copy(saved, "segment", tmp_path)
    _edit(d, **changes)
    with pytest.raises(ModelArtifactError, match=rf"{d / 'model.json'}: {message}"):
        load_model(d)


def test_task_mismatch_is_refused(saved):
    with pytest.raises(ModelArtifactError, match=r"model.json: a segment model, expected a detect model"):
        load_model(saved["root"] / "segment", task="detect")


def test_weights_that_do_not_fit_are_named(saved, tmp_path):
    d = _copy(saved, "classify", tmp_path)
    card = json.loads((d / "model.json").read_text())
    _edit(d, spec=card["spec"] | {"timm_kwargs": card["spec"]["timm_kwargs"] | {"num_classes": 5}})
    with pytest.raises(ModelArtifactError, match=r"model\.pt: the weights do not fit the model model.json describes: "
                                                 r"other shape 2: head\.weight \(3, \d+\) \(model: \(5, \d+\)\)"):
        load_model(d)
    d = _copy(saved, "segment", tmp_path)
    state = torch.load(d / "model.pt", weights_only=True)
    state.pop("decode_head.cls.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, d / "model.pt")
    with pytest.raises(ModelArtifactError, match=r"missing 1: decode_head\.cls\.bias; unexpected 1: extra\.weight"):
        load_model(d)


def test_not_a_weights_only_state_dict_is_refused(saved, tmp_path):
    import argparse

    d = _copy(saved, "detect", tmp_path)
    torch.save({"w": argparse.Namespace(a=1)}, d / "model.pt")  # a pickled object: refused by weights_only
    with pytest.raises(ModelArtifactError, match=rf"{d / 'model.pt'}: not a state dict loadable with "
                                                 r"weights_only=True \(UnpicklingError"):
        load_model(d)
    torch.save([torch.zeros(1)], d / "model.pt")
    with pytest.raises(ModelArtifactError, match=r"not a state dict \(name -> tensor\), got list"):
        load_model(d)


def test_save_refuses_weights_that_do_not_fit_and_writes_nothing(tmp_path):
    enc = micro_spec("vit")
    model = build_segmenter(enc, SEG)
    other = SEG.model_copy(update={"channels": 16})
    with pytest.raises(ModelArtifactError, match=r"model\.pt \(not written\): the weights do not fit .* other shape"):
        save_model(tmp_path / "seg", model, other, encoder=enc)
    assert not (tmp_path / "seg").exists()
    with pytest.raises(ModelArtifactError, match=r"a segment model needs 'encoder'"):
        save_model(tmp_path / "seg", model, SEG)
    assert not (tmp_path / "seg").exists()
