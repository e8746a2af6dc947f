"""`amos-ds plot RUN_DIR` draws the four figures from metrics.jsonl."""

import json

from amos_ds.cli import main


def test_plot_draws_the_paper_figures(tmp_path, capsys):
    records = [{"step": step, "loss": 40.0 - step, "mlm_loss": 20.0, "rtd_loss": 0.4, "mlm_loss_L4": 7.0,
                "mlm_loss_L6": 6.5, "mlm_loss_L8": 6.5, "mix_weight_L4": 0.5, "mix_weight_L6": 0.3,
                "mix_weight_L8": 0.2, "disc_acc_replaced": 0.3, "disc_acc_original": 0.9, "tokens_per_s": 1e4,
                "mfu": 0.4 if step > 1 else None} for step in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    names = ["losses.png", "mixture_weights.png", "disc_accuracy.png", "throughput.png"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / name) for name in names]
    assert all((tmp_path / "plots" / name).stat().st_size > 10_000 for name in names)


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
