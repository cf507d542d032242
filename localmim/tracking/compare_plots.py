"""PNG plots of ``localmim compare``: one colour per group everywhere, legends name the differing params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localmim.tracking.metrics import CURVE_KEYS, STAGE_ORDER, STEP_UNIT, axis_label, metric_order

TAP_STYLES = ("-", "--", "-.", ":", (0, (1, 1)), (0, (5, 1, 1, 1)))


def group_label(g: Any, diff: list[str]) -> str:
    """``<group>: pretrain.mask_ratio=0.6, ...`` (only the params that differ between groups)."""
    params = ", ".join(f"{k}={g.params[k]}" for k in diff)
    return f"{g.label[:28]}: {params}" if params else g.label[:40]


def _history(client: Any, run: Any, key: str) -> tuple[list[float], list[float]]:
    pts = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in pts], [m.value for m in pts]


def _pretrain_loss(client: Any, groups: list[Any], diff: list[str], colors: list[Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = [(g, c, g.runs["pretrain"]) for g, c in zip(groups, colors, strict=True) if "pretrain" in g.runs]
    taps = sorted({k for _, _, r in runs for k in r.data.metrics if k.startswith("loss_")})
    if not runs or not taps:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    for _, color, run in runs:
        for tap, style in zip(taps, TAP_STYLES * 4, strict=False):
            steps, values = _history(client, run, tap)
            if steps:  # logged at step = epoch x 1000 (MAE's epoch_1000x)
                ax.plot([s / 1000 for s in steps], values, color=color, linestyle=style, linewidth=1.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss per tap")
    ax.set_title("Pre-training loss per tap (colour: group, line style: tap)")
    groups_legend = [Line2D([], [], color=c, label=group_label(g, diff)) for g, c, _ in runs]
    taps_legend = [Line2D([], [], color="0.3", linestyle=s, label=t.removeprefix("loss_"))
                   for t, s in zip(taps, TAP_STYLES * 4, strict=False)]
    # legends beside the axes, never over the curves
    first = ax.legend(handles=groups_legend, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="group")
    ax.add_artist(first)
    ax.legend(handles=taps_legend, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8, title="tap")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _eval_curves(client: Any, groups: list[Any], diff: list[str], colors: list[Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = [(s, k) for s in STAGE_ORDER if s != "pretrain" for k in CURVE_KEYS
              if any(s in g.runs and k in g.runs[s].data.metrics for g in groups)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    for ax, (stage, key) in zip(axes[0], panels, strict=True):
        for g, color in zip(groups, colors, strict=True):
            if stage in g.runs:
                steps, values = _history(client, g.runs[stage], key)
                if steps:
                    ax.plot(steps, values, color=color, marker="o", markersize=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        unit = STEP_UNIT.get(stage, "step")  # segment / detect log per iteration, finetune / linprobe per epoch
        ax.set_xlabel(unit)
        ax.set_ylabel(axis_label(key))
        ax.set_title(f"{stage}: {key} per {unit}")
        ax.grid(alpha=0.3)
    # one legend for all panels, below them (never over a curve)
    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=group_label(g, diff))
               for g, c in zip(groups, colors, strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(groups), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(groups) - 1) // 3), 1, 1))
    return _save(fig, path, tight=False)


def _headline_bars(groups: list[Any], diff: list[str], colors: list[Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = sorted({k for g in groups for k in g.metrics}, key=metric_order)
    if not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(max(2.2 * len(cols), 6), 4), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        vals = [g.metrics.get(col, float("nan")) for g in groups]
        ax.bar(range(len(groups)), vals, color=colors)
        ax.set_xticks([])
        ax.set_title(col, fontsize=9)
        ax.set_ylabel(axis_label(col.rsplit(".", 1)[-1]))
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=[Patch(color=c, label=group_label(g, diff)) for g, c in zip(groups, colors, strict=True)],
               loc="lower center", ncol=min(len(groups), 3), fontsize=8)
    fig.suptitle("Headline metrics per group")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    return _save(fig, path, tight=False)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    from matplotlib.legend import Legend

    tmp = path.with_name(f".{path.name}.tmp.png")
    # legends outside the axes stay in; a legend added with ax.add_artist (a second one) must be named to count
    legends = [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Legend)]
    fig.savefig(tmp, dpi=110, bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_plots(client: Any, groups: list[Any], diff: list[str], out: Path) -> list[Path]:
    """``pretrain_loss.png``, ``eval_curves.png``, ``headline.png`` under ``out`` (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    colors = [cmap(i % 10) for i in range(len(groups))]
    made = [_pretrain_loss(client, groups, diff, colors, out / "pretrain_loss.png"),
            _eval_curves(client, groups, diff, colors, out / "eval_curves.png"),
            _headline_bars(groups, diff, colors, out / "headline.png")]
    return [p for p in made if p is not None]
