"""``localmim report [--all] [--out DIR]``: the results of every stage's ``metrics/<stage>.json``.

Prints each headline metric (``localmim.tracking.metrics``) next to the baselines that could beat it (chance, the
most frequent class, the training boxes guessed on every image: ``BASELINES``), as far as the stages wrote them;
``--all`` prints every numeric metric first. With ``--out`` it also writes ``DIR/metrics.tsv`` (stage, metric, value)
and ``DIR/metrics.png`` (the headline metrics of every evaluation stage, ``localmim.tracking.metrics``, each with a
line at every baseline its stage wrote, and pretraining's final loss per tap). The DAG's ``summary`` node writes
them to ``reports/`` for the Snakemake report (``snakemake --report report.html``) and ``dvc plots show``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(metrics_dir: Path) -> list[tuple[str, str, float]]:
    """(stage, metric, value) for every numeric value of every ``*.json`` in ``metrics_dir``, sorted by stage."""
    rows = []
    from localmim.tracking.metrics import TIMING_SUFFIX

    files = sorted(f for f in metrics_dir.glob("*.json") if not f.name.endswith(TIMING_SUFFIX))
    for f in files if metrics_dir.is_dir() else []:
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                rows.append((f.stem, k, float(v)))
    return rows


def write_outputs(rows: list[tuple[str, str, float]], out: Path) -> None:
    import matplotlib.pyplot as plt

    from localmim.utils.io import atomic_open, atomic_write_text

    lines = [f"{s}\t{k}\t{v:.6g}\n" for s, k, v in rows]
    atomic_write_text(out / "metrics.tsv", "stage\tmetric\tvalue\n" + "".join(lines))
    fig = metrics_figure(rows)
    with atomic_open(out / "metrics.png", "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# Line styles of the kinds of baseline (``what`` in BASELINES), given out in order of first appearance.
_BASELINE_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))


def metrics_figure(rows: list[tuple[str, str, float]]):
    """The report plot: a bar per headline score (percent) with a black line across the bar at each baseline its
    stage wrote (``BASELINES``; line gid ``baseline:<stage>.<metric>:<baseline key>``); a bar that does not beat its
    best baseline is hatched and its label red. Right: pretraining's final loss per decoder tap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from localmim.tracking.metrics import FRACTION, PERCENT, as_percent, baselines, is_headline

    values = {(s, k): v for s, k, v in rows}
    heads = [(s, k) for s, k, _ in rows if s != "pretrain" and k in PERCENT | FRACTION and is_headline(s, k)]
    scores = [(f"{s}\n{k}", as_percent(k, values[(s, k)])) for s, k in heads]
    taps = sorted((k.removeprefix("final_loss_"), v) for s, k, v in rows if s == "pretrain" and
                  k.startswith("final_loss_tap"))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.9 * len(scores), 3.8), width_ratios=(max(len(scores), 2), 3))
    for ax, data, title, xlabel, ylabel in ((axes[0], scores, "evaluation", "stage / metric", "score (%)"),
                                            (axes[1], taps, "pretraining", "decoder tap", "final loss")):
        names = [n for n, _ in data]
        ax.bar(names, [v for _, v in data], color=[f"C{i}" for i in range(len(data))])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if not data:
            ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    legend: dict[str, object] = {}
    styles: dict[str, object] = {}
    for i, (s, k) in enumerate(heads):
        written = [(b, what) for b, what in baselines(s, k) if (s, b) in values]
        for b, what in written:
            y = as_percent(k, values[(s, b)])  # bar i spans [i - 0.4, i + 0.4] (matplotlib's default width 0.8)
            style = styles.setdefault(what, _BASELINE_STYLES[len(styles) % len(_BASELINE_STYLES)])
            (line,) = axes[0].plot([i - 0.45, i + 0.45], [y, y], color="black", lw=1.5, ls=style,
                                   gid=f"baseline:{s}.{k}:{b}")
            legend.setdefault(f"baseline: {what}", line)
        if written and scores[i][1] <= max(as_percent(k, values[(s, b)]) for b, _ in written):
            bar = axes[0].patches[i]
            bar.set_hatch("//")
            axes[0].get_xticklabels()[i].set_color("red")  # a bar of height ~0 shows no hatch
            bar.set_gid(f"not-above-baseline:{s}.{k}")
            hatch = Patch(facecolor="white", edgecolor="black", hatch="//")
            legend.setdefault("hatched, red label: not above its baseline", hatch)
    if legend:  # above the bars: 40 % headroom
        axes[0].set_ylim(top=1.4 * max(axes[0].get_ylim()[1], 1e-9))
        axes[0].legend(legend.values(), legend.keys(), fontsize=6, loc="upper center", ncol=2, handlelength=4)
    fig.tight_layout()
    return fig


def headline_table(rows: list[tuple[str, str, float]]) -> list[str]:
    """Markdown lines: every headline metric in ``rows`` (scores in percent, COCO's 0-1 x100), next to the
    baselines its stage wrote (``<what> <value>`` each; a baseline the stage did not write is left out)."""
    from localmim.tracking.metrics import FRACTION, PERCENT, as_percent, baselines, is_headline, metric_order

    values = {(s, k): v for s, k, v in rows}

    def fmt(k: str, v: float) -> str:
        return f"{as_percent(k, v):.1f}" if k in PERCENT | FRACTION else f"{v:.4g}"

    heads = sorted(((s, k) for s, k in values if is_headline(s, k)), key=lambda sk: metric_order(f"{sk[0]}.{sk[1]}"))
    lines = ["| stage | metric | value | baselines that could beat it |", "|---|---|---:|---|"]
    for s, k in heads:
        unit = " (%)" if k in PERCENT | FRACTION else ""
        base = [f"{what} {fmt(k, values[(s, b)])}" for b, what in baselines(s, k) if (s, b) in values]
        lines.append(f"| {s} | {k}{unit} | {fmt(k, values[(s, k)])} | {'; '.join(base) or '-'} |")
    return lines


def provenance(mdir: Path, lock_path: Path = Path("dvc.lock")) -> list[str]:
    """Where the numbers come from: which metrics files are the results ``dvc.lock`` records (md5, as DVC hashes
    them), and a note when MLflow has no store here (a pulled pipeline: the runs stayed with the machine that ran it).
    """
    import hashlib

    from localmim.tracking.mlflow_run import tracking_uri

    lines = []
    if lock_path.is_file():
        from localmim.utils.dvclock import YAMLError, read_lock

        try:
            recorded = {Path(str(o.get("path"))): o.get("md5") for st in read_lock(lock_path).values()
                        for o in st.get("outs") or [] if isinstance(o, dict)}
        except YAMLError as e:
            return [f"{e}"]
        files = sorted(f for f in recorded if f.parent == mdir and f.suffix == ".json")
        same = [f for f in files if f.is_file() and hashlib.md5(f.read_bytes()).hexdigest() == recorded[f]]
        lines.append(f"{len(same)} of {len(files)} metrics files listed in {lock_path} match it (its recorded results)")
        lines += [f"  {f}: not the result {lock_path} records (`dvc status` says why)" for f in files if f not in same]
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        lines.append(f"MLflow has no runs here (no store at {uri}): the numbers come from {mdir}/ and {lock_path}; "
                     "`localmim compare` compares the DVC experiments")
    return lines


def report(args: argparse.Namespace) -> int:
    mdir = Path(args.metrics_dir)
    rows = collect(mdir)
    if not rows:
        print(f"no metrics under {mdir}/ yet (run `make demo` or `snakemake`)")
        return 1
    if getattr(args, "all", False):
        print(f"| {'stage':<12} | {'metric':<28} | {'value':>12} |")
        print(f"|{'-' * 14}|{'-' * 30}|{'-' * 14}|")
        for stage, k, v in rows:
            print(f"| {stage:<12} | {k:<28} | {v:>12.4g} |")
        print()
    print("\n".join(headline_table(rows)))
    print(f"\n({len(rows)} numbers in {mdir}/*.json; `localmim report --all` lists them all)")
    if not getattr(args, "out", None):  # the DAG's summary node (--out) runs before dvc.lock is updated
        for line in provenance(mdir):
            print(line)
    if getattr(args, "out", None):
        write_outputs(rows, Path(args.out))
        print(f"wrote {args.out}/metrics.tsv and {args.out}/metrics.png")
    return 0
