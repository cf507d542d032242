"""``localmim compare``'s PNGs keep every legend placed beside the axes (a second legend is added with
``ax.add_artist``, which a tight bounding box ignores unless it is named)."""

from __future__ import annotations


def test_saved_plot_holds_both_legends_beside_the_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from localmim.tracking.compare_plots import _save

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    long = ax.legend(handles=[Line2D([], [], label="snakemake-20261206T205519-25: pretrain.mask_ratio=0.75")],
                     loc="upper left", bbox_to_anchor=(1.02, 1.0))  # fmt: skip
    ax.add_artist(long)
    ax.legend(handles=[Line2D([], [], label="tap1")], loc="lower left", bbox_to_anchor=(1.02, 0.0))
    _save(fig, tmp_path / "p.png")  # tight_layout, then a tight bounding box at 110 dpi
    fig.canvas.draw()  # the layout _save left: where the legend and the axes' labels are, in pixels
    right_in = long.get_window_extent().x1 / fig.dpi
    left_in = ax.get_tightbbox().x0 / fig.dpi
    width_px = matplotlib.image.imread(tmp_path / "p.png").shape[1]
    assert width_px >= (right_in - left_in) * 110 - 1  # the long legend is not cut off
