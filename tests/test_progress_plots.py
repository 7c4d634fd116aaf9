"""The per-epoch plots stay readable after nnU-Net's progress plot has set seaborn's large fonts for the process."""
import seaborn as sns

from nnscd.core.progress_plots import per_epoch_figure, plot_per_epoch


def test_keep_plot_fits_its_labels_after_nnunet_changed_the_style(tmp_path):
    sns.set(font_scale=2.5)  # what nnU-Net's logger does before every progress.png
    try:
        series = {f"after stage {i + 1}": [0.9, 0.8, 0.85] for i in range(3)}
        fig = per_epoch_figure(series, "Foreground tokens kept by STP (validation batches)",
                               "share of foreground tokens kept", references={"after stage 1": 0.5})
        ax = fig.axes[0]
        assert ax.title.get_fontsize() <= 12 and ax.xaxis.label.get_fontsize() <= 11
        renderer = fig.canvas.get_renderer()
        figure_box = fig.bbox
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):  # nothing cut off at the figure's edges
            box = text.get_window_extent(renderer)
            assert box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1 and box.y1 <= figure_box.y1, text.get_text()
        plot_per_epoch(series, str(tmp_path / "token_keep_progress.png"), "t", "y")
        assert (tmp_path / "token_keep_progress.png").stat().st_size > 0
    finally:
        sns.reset_orig()
