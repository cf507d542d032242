"""Resume on another world size (issue 30 item 2): a pre-training run killed mid-epoch on W ranks continues on W'
ranks at the same optimizer step, with the lr of every step and the samples of the interrupted epoch (each exactly
once) of an uninterrupted run. The global batch (8) is the recipe: 2 ranks x batch 4 without accumulation, 1 rank x
batch 4 with 2 micro-batches per step; so one uninterrupted 2-rank run is the reference of both directions.

Every rank of every run records, per micro-batch, the epoch, the optimizer step within the epoch and the sample
keys it trained on (from the batches the method consumed), and rank 0 records the lr the loop logged at each step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from pretrain_helpers import make_shards

from tests.conftest import cli_env

N, STEPS = 24, 3  # samples; optimizer steps per epoch at global batch 8 (no sample dropped: every key once)

SCRIPT = '''
import json, os, signal, sys
from localmim.config.pretrain import PretrainConfig
from localmim.train import pretrain as P

data, ckpt, out, kill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = PretrainConfig(model="localmim_vit_micro_patch8", input_size=32, global_batch=8, batch_size=4, epochs=2,
                     warmup_epochs=1, blr=1e-2, num_workers=0, shuffle_buffer=4, log_every=1, ckpt_minutes=1e-9)
rank = int(os.environ.get("RANK", "0"))
where = {"epoch": 0, "done": 0, "micro": 0}
batches, loss = P.PretrainMethod.batches, P.PretrainMethod.loss

def batches_(self, epoch, done, position):
    where.update(epoch=epoch, done=done, micro=0)
    return batches(self, epoch, done, position)

def loss_(self, batch):
    step = where["done"] + where["micro"] // self.loader.ds.accum
    where["micro"] += 1
    with open(os.path.join(out, f"keys{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": where["epoch"], "step": step, "keys": list(map(str, batch[1][1]))}) + "\\n")
    return loss(self, batch)

P.PretrainMethod.batches, P.PretrainMethod.loss = batches_, loss_

def log_fn(metrics, step):
    with open(os.path.join(out, "lr.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "lr": metrics["lr"]}) + "\\n")
    if step == kill:  # a mid-epoch checkpoint exists after the step before
        os.kill(os.getpid(), signal.SIGKILL)

r = P.run_pretrain(cfg, data, ckpt, log_fn, progress=False)
if rank == 0:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"steps": r.metrics["steps"], "epochs": r.metrics["epochs_done"]}, f)
'''


def _launch(tmp_path: Path, world: int, run: str, kill: int = 0):
    import subprocess

    (tmp_path / run).mkdir(exist_ok=True)
    args = [str(tmp_path / "s"), str(tmp_path / f"ck_{run}"), str(tmp_path / run), str(kill)]
    cmd = [sys.executable, str(tmp_path / "train.py"), *args]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *cmd[1:]]
    return subprocess.run(cmd, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _records(d: Path) -> dict[str, list[dict]]:
    """Each rank's records (``keys<rank>.jsonl``), by file name."""
    return {f.name: _read(f) for f in sorted(d.glob("keys*.jsonl"))}


def _keys(records: dict[str, list[dict]], epoch: int, skip: dict[str, int] | None = None) -> list[str]:
    """The keys trained on in ``epoch``, after the first ``skip[file]`` records of each file."""
    return [k for name, rs in records.items() for r in rs[(skip or {}).get(name, 0):] if r["epoch"] == epoch
            for k in r["keys"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-rank run: its lr per step and the keys of each epoch."""
    tmp = tmp_path_factory.mktemp("world")
    make_shards(tmp / "s", n=N, per_shard=4)
    (tmp / "train.py").write_text(SCRIPT)
    p = _launch(tmp, 2, "ref")
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_killed_mid_epoch_resumes_on_another_world_size(reference, before, after):
    tmp, run = reference, f"w{before}to{after}"
    killed = _launch(tmp, before, run, kill=STEPS + 2)  # epoch 1 after its second step; checkpoint after its first
    assert killed.returncode != 0 and not (tmp / run / "result.json").exists()
    seen_before, lr_before = _records(tmp / run), _read(tmp / run / "lr.jsonl")
    resumed = _launch(tmp, after, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(epoch 1, step {STEPS + 1})" in resumed.stdout, resumed.stdout[-2000:]  # the mid-epoch checkpoint
    ref, got = (json.loads((tmp / d / "result.json").read_text()) for d in ("ref", run))
    assert got == ref == {"steps": 2 * STEPS, "epochs": 2}
    # the lr of every optimizer step: the killed run's up to the checkpoint, then the resumed run's
    lr_after = _read(tmp / run / "lr.jsonl")[len(lr_before):]
    lr = {r["step"]: r["lr"] for r in lr_before if r["step"] <= STEPS + 1} | {r["step"]: r["lr"] for r in lr_after}
    assert [r["step"] for r in lr_after] == [STEPS + 2, STEPS + 3]
    assert lr == {r["step"]: r["lr"] for r in _read(tmp / "ref" / "lr.jsonl")}
    # the interrupted epoch: the killed run's first step, then the resumed run's; every key exactly once
    kept = [k for rs in seen_before.values() for r in rs if r["epoch"] == 1 and r["step"] < 1 for k in r["keys"]]
    after_resume = _keys(_records(tmp / run), 1, skip={name: len(rs) for name, rs in seen_before.items()})
    assert len(kept) == 8 and len(after_resume) == 16  # one global batch before the checkpoint, two after
    epoch1 = Counter(kept + after_resume)
    assert set(epoch1.values()) == {1} and len(epoch1) == N
    assert epoch1 == Counter(_keys(_records(tmp / "ref"), 1))
