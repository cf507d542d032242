"""Record in DVC what a successful Snakemake run produced, so both tools share one working copy.

Called by the Snakefile's ``onsuccess`` with the rules of the run and Snakemake's params file:
``python -m localmim.pipeline.dvc_sync --params FILE RULE...``. A stage is recorded (``dvc commit --force``:
its deps, params, outputs and command go to ``dvc.lock``, its outputs to the DVC cache) only when

* it is a DVC stage of ``dvc.yaml`` and every declared output exists, and
* the params it declares are the same in Snakemake's config and in ``params.yaml`` (after validation, so
  defaults compare equal). A run with ``--configfile`` / ``--config`` that changed them produced outputs that
  ``params.yaml`` does not describe: those stages are left unrecorded and named, so ``dvc status`` tells the truth.

Nothing is done (one line says why) outside a DVC repository or when DVC cannot run (e.g. no git repository).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from localmim.config import ParamsError, all_sections, read_params_file, validate_section

PROG = "localmim dvc-sync"


def _value(tree: dict[str, Any], key: str) -> Any:
    """The validated value of params key ``key`` (``section`` or ``section.a.b``) in ``tree``."""
    section, *rest = key.split(".")
    cls = all_sections().get(section)
    value: Any = validate_section(section, cls, tree.get(section)).to_dict() if cls else tree.get(section)
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def plan(stages: dict[str, Any], rules: list[str], smk: dict[str, Any], ws: dict[str, Any]) -> tuple[list, dict]:
    """Split the run's rules into DVC stages to record and the others, each with its reason."""
    record, skipped = [], {}
    for rule in rules:
        st = stages.get(rule)
        if st is None:
            continue
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in st.get("outs", []) + st.get("metrics", [])]
        missing = [o for o in outs if not Path(o).exists()]
        changed = [k for k in st.get("params", []) if isinstance(k, str) and _value(smk, k) != _value(ws, k)]
        if missing:
            skipped[rule] = f"missing output {missing[0]}"
        elif changed:
            skipped[rule] = f"Snakemake's config differs from params.yaml in {', '.join(changed)}"
        else:
            record.append(rule)
    return record, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--params", required=True, help="the params file Snakemake's commands read")
    p.add_argument("--workspace-params", default="params.yaml", help="the params file DVC reads")
    p.add_argument("rules", nargs="*")
    args = p.parse_args(argv)
    if not (Path(".dvc").is_dir() and Path("dvc.yaml").is_file()):
        print(f"{PROG}: no DVC repository here; nothing recorded")
        return 0
    try:
        stages = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {})
        record, skipped = plan(stages, args.rules, read_params_file(args.params),
                               read_params_file(args.workspace_params))
    except (ParamsError, yaml.YAMLError) as e:
        print(f"{PROG}: not recorded in DVC: {e}", file=sys.stderr)
        return 0
    for rule, why in skipped.items():
        print(f"{PROG}: {rule}: not recorded in DVC ({why}); `dvc status` lists it")
    if not record:
        return 0
    cmd = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *record]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["(no message)"]
        print(f"{PROG}: not recorded in DVC: `dvc commit` failed: {last[0]}", file=sys.stderr)
        return 0
    print(f"{PROG}: recorded in DVC (dvc.lock): {', '.join(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
