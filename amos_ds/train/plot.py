"""`amos-ds plot RUN_DIR`: PNGs of a run's metrics.jsonl in RUN_DIR/plots.

    losses.png            total, per-head MLM and RTD loss; held-out ones as dots beside them
    mixture_weights.png   mean mixture weight of each generator head over training (the paper's Figure 3a)
    disc_accuracy.png     discriminator accuracy on replaced (and original) tokens (the paper's Figure 3b), training
                          and held-out
    held_out.png          held-out RTD AUC, the probe against its majority baseline, and the health of the
                          discriminator's token states (when the run evaluated)
    throughput.png        tokens/s and MFU
"""

from pathlib import Path

from amos_ds.errors import ConfigError
from amos_ds.train.health import COLLAPSE_MEAN_COSINE
from amos_ds.train.metrics import read_metrics
from amos_ds.train.summary import read_summary


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _plot_held_out(ax, records: list[dict], name: str, **style) -> None:
    """A held-out series as dots joined by dashes, when the run evaluated."""
    steps, values = _series(records, name)
    if steps:
        ax.plot(steps, values, marker="o", linestyle="--", **style)


def _head_layers(records: list[dict], prefix: str) -> list[str]:
    return sorted((name for name in records[-1] if name.startswith(prefix)), key=lambda n: int(n.removeprefix(prefix)))


def plot_run(run_dir: Path | str) -> list[Path]:
    """Draw the figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"amos-ds plot {run_dir}: no metrics.jsonl records there; is it a run directory?")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    fig, (mlm, rtd) = plt.subplots(1, 2, figsize=(13, 4))
    mlm.plot(*_series(records, "mlm_loss"), label="MLM, sum of heads", color="black")
    for name in _head_layers(records, "mlm_loss_L"):
        line, = mlm.plot(*_series(records, name), label=f"head at layer {name.removeprefix('mlm_loss_L')}")
        _plot_held_out(mlm, records, f"eval_{name}", color=line.get_color(),
                       label=f"held-out, layer {name.removeprefix('mlm_loss_L')}")
    summary = read_summary(run_dir)
    if summary:  # a generator that ignores the context scores the unigram entropy at best
        mlm.axhline(summary["unigram_entropy"], color="grey", linestyle=":", label="unigram entropy of the data")
    mlm.set(title="generator MLM loss", xlabel="step", ylabel="cross-entropy")
    mlm.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: inside, it hid the curves
    rtd.plot(*_series(records, "rtd_loss"), color="tab:red", label="RTD loss")
    _plot_held_out(rtd, records, "eval_rtd_loss", color="tab:red", label="held-out")
    _plot_held_out(rtd, records, "eval_rtd_loss_constant", color="grey", label="held-out constant guess")
    if all("rtd_loss_constant" in record for record in records):  # runs before this metric existed lack it
        rtd.plot(*_series(records, "rtd_loss_constant"), color="grey", linestyle=":", label="best constant guess")
        rtd.legend()
    rtd.set(title="discriminator RTD loss", xlabel="step", ylabel="binary cross-entropy")
    save(fig, "losses.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in _head_layers(records, "mix_weight_L"):
        ax.plot(*_series(records, name), label=f"layer {name.removeprefix('mix_weight_L')}")
    ax.set(title="mixture weight per generator head (Fig. 3a)", xlabel="step", ylabel="mean weight", ylim=(0, 1))
    ax.legend()
    save(fig, "mixture_weights.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(records, "disc_acc_replaced"), label="replaced tokens")
    ax.plot(*_series(records, "disc_acc_original"), label="original tokens", linestyle="--")
    _plot_held_out(ax, records, "eval_disc_acc_replaced", label="held-out, replaced")
    _plot_held_out(ax, records, "eval_disc_acc_original", label="held-out, original")
    ax.set(title="discriminator accuracy (Fig. 3b)", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax.legend(loc="center right")  # clear of the curves near 0 and 1
    save(fig, "disc_accuracy.png")

    if any("eval_rtd_auc" in record for record in records):
        fig, (auc, probe, health) = plt.subplots(1, 3, figsize=(15, 4))
        auc.plot(*_series(records, "eval_rtd_auc"), marker="o", color="tab:red")
        auc.axhline(0.5, color="grey", linestyle=":", label="chance")
        auc.set(title="held-out RTD AUC (replaced vs original)", xlabel="step", ylabel="AUC")
        auc.legend()
        probe.plot(*_series(records, "probe_accuracy"), marker="o", label="linear probe, dev")
        probe.plot(*_series(records, "probe_majority"), color="grey", linestyle=":", label="majority class")
        probe.set(title="probe on frozen discriminator features", xlabel="step", ylabel="accuracy")
        if any("probe_accuracy" in record for record in records):
            probe.legend()
        else:
            probe.text(0.5, 0.5, "no --probe-task", ha="center", transform=probe.transAxes)
            probe.set(xticks=[], yticks=[])  # no data: matplotlib's default axis would read as a scale
        health.plot(*_series(records, "health_mean_cosine"), marker="o", label="mean cosine between tokens")
        health.axhline(COLLAPSE_MEAN_COSINE, color="grey", linestyle=":", label="collapse threshold")
        health.set(title="discriminator token states", xlabel="step", ylabel="mean cosine", ylim=(-0.05, 1.05))
        rank = health.twinx()
        rank.plot(*_series(records, "health_effective_rank"), marker="s", color="tab:green", label="effective rank")
        rank.set(ylabel="effective rank", ylim=(0, None))
        health.legend(loc="lower left")
        rank.legend(loc="lower right")
        save(fig, "held_out.png")

    fig, (speed, mfu) = plt.subplots(1, 2, figsize=(11, 4))
    speed.plot(*_series(records, "tokens_per_s"))
    speed.set(title="throughput", xlabel="step", ylabel="tokens / s")
    steps, values = _series(records, "mfu")
    mfu.plot(steps, [100 * v for v in values])
    mfu.set(title="model FLOPs utilisation", xlabel="step", ylabel="MFU (%)")
    save(fig, "throughput.png")
    return written
