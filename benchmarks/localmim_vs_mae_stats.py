"""Statistics, table and plot of ``localmim_vs_mae.py``: means and spread over seeds, the epoch at which LocalMIM
reaches MAE's final accuracy (and the reverse) with a bootstrap over seeds, wall time per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METHODS = ("LocalMIM", "MAE")
METRICS = {"knn": "kNN", "probe": "linear probe"}


def curves(runs: list[dict], method: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Eval epochs ``[P]`` and values ``[seeds, P]`` of one method and metric."""
    rs = [r for r in runs if r["method"] == method]
    epochs = np.array([p["epoch"] for p in rs[0]["curve"]], dtype=float)
    return epochs, np.array([[p[metric] for p in r["curve"]] for r in rs], dtype=float)


def summarize(runs: list[dict]) -> dict:
    """Per method: epochs, mean / sd over seeds of every metric, seconds per epoch, per-block means at the end."""
    out = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        d = {"seeds": len(rs), "sec_per_epoch": [r["sec_per_epoch"] for r in rs]}
        for k in METRICS:
            ep, y = curves(runs, m, k)
            d["epochs"], d[k] = ep.tolist(), {"mean": y.mean(0).tolist(), "sd": y.std(0, ddof=1).tolist()
                                              if len(rs) > 1 else [0.0] * y.shape[1]}
        blocks = [r["blocks"] for r in rs if r.get("blocks")]
        d["blocks"] = {k: np.mean([b[k] for b in blocks], 0).tolist() for k in blocks[0]} if blocks else {}
        out[m] = d
    return out


def crossing(epochs: np.ndarray, y: np.ndarray, target: float) -> float:
    """First epoch at which the curve ``y`` reaches ``target`` (linear between eval points); inf if never."""
    hit = np.flatnonzero(y >= target)
    if not len(hit):
        return float("inf")
    i = hit[0]
    if i == 0:
        return float(epochs[0])
    return float(epochs[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (epochs[i] - epochs[i - 1]))


def crossing_bootstrap(runs: list[dict], metric: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Epochs for LocalMIM's mean curve to reach MAE's mean final value (``lm_reaches_mae``) and the reverse, plus
    the final gap LocalMIM - MAE; each with a point estimate and a bootstrap over seeds (seeds resampled with
    replacement, independently per method): 5/50/95th percentiles among resamples that reach, share that never do."""
    ep, lm = curves(runs, "LocalMIM", metric)
    _, mae = curves(runs, "MAE", metric)
    rng = np.random.default_rng(seed)

    def stats(a: np.ndarray, b: np.ndarray) -> dict:
        return {"a_reaches_b": crossing(ep, a.mean(0), b.mean(0)[-1]),
                "b_reaches_a": crossing(ep, b.mean(0), a.mean(0)[-1]), "gap": a.mean(0)[-1] - b.mean(0)[-1]}

    point = stats(lm, mae)
    boots = [stats(lm[rng.integers(0, len(lm), len(lm))], mae[rng.integers(0, len(mae), len(mae))])
             for _ in range(n_boot)]
    out = {"epochs": float(ep[-1])}
    for k, name in (("a_reaches_b", "lm_reaches_mae"), ("b_reaches_a", "mae_reaches_lm"), ("gap", "gap")):
        v = np.array([b[k] for b in boots])
        fin = v[np.isfinite(v)]
        q = np.percentile(fin, [5, 50, 95]).tolist() if len(fin) else [float("inf")] * 3
        out[name] = {"point": point[k], "p5": q[0], "p50": q[1], "p95": q[2], "never": float(np.mean(~np.isfinite(v)))}
    return out


def _ms(mean: float, sd: float) -> str:
    return f"{mean:.1f} ± {sd:.1f}"


def _ep(v: float, total: float) -> str:
    return f"> {total:.0f}" if not np.isfinite(v) else f"{v:.1f}"


def table(raw: dict, stats: dict, cross: dict) -> str:
    a, n_val, nc = raw["args"], raw["n_val"], raw["num_classes"]
    chance = 100.0 / nc
    se = 100.0 * np.sqrt(0.5 * 0.5 / n_val)
    spe = {m: np.mean(stats[m]["sec_per_epoch"]) for m in METHODS}
    lines = [
        f"LocalMIM vs MAE, preset `{a['preset']}`: `{a['size']}` ViT at {a['input_size']} px; synth shapes with **no "
        f"colour prior** (class = shape only), {raw['n_pool']} unlabelled pre-training images, {raw['n_label_train']} "
        f"labelled train images (kNN bank / probe), {n_val} val images, {nc} classes (chance {chance:.0f}%); "
        f"{a['epochs']} pre-training epochs, {a['seeds']} seeds per method (seed = init + masking + data order), "
        f"params.yaml `pretrain` recipe otherwise; total {raw['seconds'] / 60:.1f} min.",
        "",
        f"Top-1 % on val, mean ± sd over seeds, of the top block's pooled features (kNN: cosine, k 20, T 0.07; probe: "
        f"logistic regression on standardised features). Epoch 0 = random init. One run's binomial standard error "
        f"is up to {se:.1f} points ({n_val} val images).",
        "",
        "| epoch | LocalMIM kNN | MAE kNN | LocalMIM probe | MAE probe |",
        "|---|---|---|---|---|",
    ]
    L, M = stats["LocalMIM"], stats["MAE"]
    for i, e in enumerate(L["epochs"]):
        cells = [_ms(s[k]["mean"][i], s[k]["sd"][i]) for k in METRICS for s in (L, M)]
        lines.append(f"| {e:.0f} | {' | '.join(cells)} |")
    lines += ["", f"Pre-training seconds per epoch (evaluation excluded): LocalMIM {spe['LocalMIM']:.1f}, MAE "
              f"{spe['MAE']:.1f} (LocalMIM / MAE = {spe['LocalMIM'] / spe['MAE']:.2f}).", "",
              "| measure | LocalMIM reaches MAE's final at epoch (90% bootstrap) | wall-time speed-up | MAE reaches "
              "LocalMIM's final at epoch | final gap LocalMIM - MAE (90%) |", "|---|---|---|---|---|"]
    for k, name in METRICS.items():
        c = cross[k]
        lm, mr = c["lm_reaches_mae"], c["mae_reaches_lm"]
        speed = (c["epochs"] * spe["MAE"]) / (lm["point"] * spe["LocalMIM"]) if np.isfinite(lm["point"]) and \
            lm["point"] > 0 else float("nan")
        lines.append(f"| {name} | {_ep(lm['point'], c['epochs'])} [{_ep(lm['p5'], c['epochs'])}, "
                     f"{_ep(lm['p95'], c['epochs'])}], never in {100 * lm['never']:.0f}% | {speed:.2f}x | "
                     f"{_ep(mr['point'], c['epochs'])} (never in {100 * mr['never']:.0f}%) | "
                     f"{c['gap']['point']:+.1f} [{c['gap']['p5']:+.1f}, {c['gap']['p95']:+.1f}] |")
    if L["blocks"] and M["blocks"]:
        lines += ["", "After the last epoch, per block (mean over seeds): probe / kNN top-1 and attention NMI "
                  "(method §10.2) of the exported encoder.", "",
                  "| block | LocalMIM probe | MAE probe | LocalMIM kNN | MAE kNN | LocalMIM NMI | MAE NMI |",
                  "|---|---|---|---|---|---|---|"]
        for i in range(len(L["blocks"]["probe_top1"])):
            lb, mb = L["blocks"], M["blocks"]
            lines.append(f"| {i + 1} | {lb['probe_top1'][i]:.1f} | {mb['probe_top1'][i]:.1f} | {lb['knn_top1'][i]:.1f}"
                         f" | {mb['knn_top1'][i]:.1f} | {lb['attn_nmi'][i]:.3f} | {mb['attn_nmi'][i]:.3f} |")
    return "\n".join(lines)


def write_plot(raw: dict, stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    chance = 100.0 / raw["num_classes"]
    for ax, k in zip(axes[:2], METRICS, strict=True):
        for m, style in zip(METHODS, ("o-", "s--"), strict=True):
            s = stats[m]
            x = np.array(s["epochs"])
            mu, sd = np.array(s[k]["mean"]), np.array(s[k]["sd"])
            ax.plot(x, mu, style, ms=3, label=f"{m} ({np.mean(s['sec_per_epoch']):.0f} s/epoch)")
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
        ax.axhline(chance, color="black", lw=0.8, ls="-.", label="chance")
        ax.set(xlabel="pre-training epoch (0 = random init)", ylabel="val top-1 (%)",
               title=f"{METRICS[k]} top-1, mean ± sd over {stats['MAE']['seeds']} seeds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax, key, label in ((axes[2], "probe_top1", "probe top-1 (%)"), (axes[3], "attn_nmi", "attention NMI")):
        for m, style in zip(METHODS, ("o-", "s--"), strict=True):
            b = stats[m]["blocks"]
            if b:
                ax.plot(np.arange(1, len(b[key]) + 1), b[key], style, ms=3, label=m)
        ax.set(xlabel="block", ylabel=label, title=f"per block after the last epoch: {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
