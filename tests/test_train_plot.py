"""`amos-ds plot RUN_DIR` draws the figures from metrics.jsonl, held-out curves beside the training ones."""

import json

import matplotlib.figure
import pytest

from amos_ds.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch) -> dict[str, list[dict]]:
    """What each saved figure shows: {file name: [per axes: {"title", "ylim", "lines": {label: (xs, ys)}}]}."""
    figures = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(figure, path, **kwargs):
        figures[path.name] = [{"title": ax.get_title(), "ylim": ax.get_ylim(),
                               "lines": {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                         for line in ax.get_lines()}} for ax in figure.axes]
        real_savefig(figure, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def test_plot_draws_the_paper_figures(tmp_path, capsys, drawn):
    steps = [1, 2, 3, 4, 5]
    records = [{"step": step, "loss": 40.0 - step, "mlm_loss": 20.0, "rtd_loss": 0.4, "mlm_loss_L4": 7.0,
                "mlm_loss_L6": 6.5, "mlm_loss_L8": 6.5, "mix_weight_L4": 0.5, "mix_weight_L6": 0.3,
                "mix_weight_L8": 0.2, "disc_acc_replaced": 0.3, "disc_acc_original": 0.9, "tokens_per_s": 1e4 * step,
                "mfu": 0.4 if step > 1 else None} for step in steps]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    names = ["losses.png", "mixture_weights.png", "disc_accuracy.png", "throughput.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / name) for name in names]
    assert all((tmp_path / "plots" / name).read_bytes().startswith(PNG_SIGNATURE) for name in names)

    mlm, rtd = drawn["losses.png"]
    assert mlm["lines"] == {"MLM, sum of heads": (steps, [20.0] * 5), "head at layer 4": (steps, [7.0] * 5),
                            "head at layer 6": (steps, [6.5] * 5), "head at layer 8": (steps, [6.5] * 5)}
    assert rtd["lines"] == {"RTD loss": (steps, [0.4] * 5)}
    (mixture,) = drawn["mixture_weights.png"]  # Figure 3a
    assert mixture["lines"] == {"layer 4": (steps, [0.5] * 5), "layer 6": (steps, [0.3] * 5),
                                "layer 8": (steps, [0.2] * 5)}
    assert mixture["ylim"] == (0, 1)
    (accuracy,) = drawn["disc_accuracy.png"]  # Figure 3b
    assert accuracy["lines"] == {"replaced tokens": (steps, [0.3] * 5), "original tokens": (steps, [0.9] * 5)}
    speed, mfu = drawn["throughput.png"]
    assert speed["lines"]["_child0"] == (steps, [1e4, 2e4, 3e4, 4e4, 5e4])
    assert mfu["lines"]["_child0"] == ([2, 3, 4, 5], [40.0] * 4)  # percent; step 1 had no MFU


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"amos-ds: error: amos-ds plot {tmp_path}: no metrics.jsonl records there; " \
                                      "is it a run directory?\n"


def test_plot_skips_a_torn_last_line(tmp_path, capsys):
    record = {"step": 1, "loss": 40.0, "mlm_loss": 20.0, "rtd_loss": 0.4, "mlm_loss_L2": 7.0, "mix_weight_L2": 1.0,
              "disc_acc_replaced": 0.3, "disc_acc_original": 0.9, "tokens_per_s": 1e4, "mfu": None}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "step": 2})[:30])
    assert main(["plot", str(tmp_path)]) == 0
    assert "dropped its last line, a record cut short" in capsys.readouterr().err
    assert (tmp_path / "plots" / "losses.png").is_file()


def test_plot_draws_the_held_out_curves_beside_the_training_ones(tmp_path, capsys, drawn):
    records = [{"step": step, "loss": 30.0, "mlm_loss": 20.0, "rtd_loss": 0.4, "rtd_loss_constant": 0.42,
                "mlm_loss_L2": 7.0, "mix_weight_L2": 1.0, "disc_acc_replaced": 0.1, "disc_acc_original": 0.9,
                "tokens_per_s": 1e4, "mfu": None} for step in range(1, 5)]
    for step, auc in ((2, 0.55), (4, 0.6)):
        records[step - 1].update(eval_mlm_loss_L2=6.9 + step, eval_rtd_loss=0.41, eval_rtd_loss_constant=0.42,
                                 eval_rtd_auc=auc, eval_disc_acc_replaced=0.02, eval_disc_acc_original=0.99,
                                 health_mean_cosine=0.5, health_effective_rank=20.0)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    assert "held_out.png" in capsys.readouterr().out
    mlm, rtd = drawn["losses.png"]
    assert mlm["lines"]["held-out, layer 2"] == ([2, 4], [8.9, 10.9])
    assert rtd["lines"]["held-out"] == ([2, 4], [0.41, 0.41])
    (accuracy,) = drawn["disc_accuracy.png"]
    assert accuracy["lines"]["held-out, replaced"] == ([2, 4], [0.02, 0.02])
    auc, probe, health, rank = drawn["held_out.png"]
    assert auc["lines"]["_child0"] == ([2, 4], [0.55, 0.6])
    assert health["lines"]["mean cosine between tokens"] == ([2, 4], [0.5, 0.5])
    assert rank["lines"]["effective rank"] == ([2, 4], [20.0, 20.0])
    assert not probe["lines"]["linear probe, dev"][0]  # no --probe-task: nothing drawn
