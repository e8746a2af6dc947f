"""The main job's last lines: the unigram entropy of the training tokens, and the averages over the last steps."""

import json
import math

import numpy as np
import pytest
from conftest import text_corpus

from amos_ds.data import open_corpora
from amos_ds.train.plot import plot_run
from amos_ds.train.summary import learning_summary, read_summary, summary_lines, unigram_entropy, write_summary
from amos_ds.vocab import AMOS_DS_SPECIAL_TOKENS

TEXT = "".join(f"Sentence number {i} says the {'cat' if i % 3 else 'dog'} sat on mat {i % 7}.\n\n" for i in range(300))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("summary"), TEXT)


def test_unigram_entropy_counts_the_ordinary_tokens_of_every_sample(corpus):
    dataset = open_corpora([str(corpus)], seq_len=32, seed=0)
    tokens = dataset.corpora[0].tokens(0, dataset.corpora[0].num_tokens)  # every sample, each token once
    counts = np.bincount(tokens[tokens >= len(AMOS_DS_SPECIAL_TOKENS)])
    expected = -sum(c / counts.sum() * math.log(c / counts.sum()) for c in counts if c)
    assert len(dataset) < 4096 and unigram_entropy(dataset) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(dataset, max_samples=3) != pytest.approx(expected, rel=1e-6)  # a sample of 3 differs


def test_learning_summary_averages_the_last_steps_of_the_deepest_head():
    records = [{"step": s, "mlm_loss_L1": 9.0, "mlm_loss_L3": 7.0 - s / 100, "disc_acc_replaced": s / 40,
                "disc_acc_original": 0.9, "rtd_loss": 0.5 - s / 1000, "rtd_loss_constant": 0.42}
               for s in range(1, 21)]
    summary = learning_summary(records, entropy=7.0)
    # steps 11..20: mean of 7 - s/100 = 6.845, 0.155 below; replaced accuracy mean of s/40 = 15.5/40 = 0.3875;
    # RTD loss mean of 0.5 - s/1000 = 0.4845, 0.0645 above 0.42
    assert summary["mlm_loss"] == pytest.approx(6.845) and summary["disc_acc_replaced"] == pytest.approx(0.3875)
    assert summary["rtd_loss"] == pytest.approx(0.4845) and summary["rtd_loss_constant"] == pytest.approx(0.42)
    assert (summary["first_step"], summary["last_step"], summary["deepest_head"]) == (11, 20, 3)
    mlm, replaced = summary_lines(summary)
    assert mlm == ("summary (steps 11-20): deepest generator head (layer 3) MLM loss 6.845 nats, 0.155 below the "
                   "unigram entropy of the training tokens (7.000)")
    assert replaced == ("summary (steps 11-20): discriminator RTD loss 0.485, 0.065 above the best constant guess "
                        "(0.420); accuracy on replaced tokens 0.388, on original tokens 0.900")
    below = summary_lines(learning_summary([{**r, "rtd_loss_constant": 0.5} for r in records], 7.0))[1]
    assert "RTD loss 0.485, 0.015 below the best constant guess (0.500)" in below
    above = summary_lines(learning_summary(records, 6.69))[0]
    assert "0.155 above the unigram entropy of the training tokens (6.690)" in above


def test_write_summary_keeps_the_numbers_for_the_plot(corpus, tmp_path, capsys):
    records = [{"step": s, "mlm_loss_L3": 5.0, "disc_acc_replaced": 0.5, "disc_acc_original": 0.9, "mlm_loss": 15.0,
                "rtd_loss": 0.3, "rtd_loss_constant": 0.42, "mix_weight_L3": 1.0, "tokens_per_s": 1e3, "mfu": None}
               for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = open_corpora([str(corpus)], seq_len=32, seed=0)
    write_summary(tmp_path, dataset)
    assert capsys.readouterr().out.splitlines() == summary_lines(read_summary(tmp_path))
    assert read_summary(tmp_path)["unigram_entropy"] == unigram_entropy(dataset)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert plot_run(tmp_path)  # draws with the entropy line


def test_summary_reports_the_last_held_out_evaluation():
    records = [{"step": s, "mlm_loss_L3": 5.0, "disc_acc_replaced": 0.0, "disc_acc_original": 1.0, "rtd_loss": 0.4,
                "rtd_loss_constant": 0.42} for s in range(1, 5)]
    records[1].update(eval_mlm_loss=20.0, eval_mlm_loss_L3=9.0, eval_mlm_acc_L3=0.0)  # an earlier evaluation
    records[3].update(eval_mlm_loss=18.0, eval_mlm_loss_L1=6.5, eval_mlm_acc_L1=0.1, eval_mlm_loss_L3=6.25,
                      eval_mlm_acc_L3=0.125, eval_rtd_loss=0.395, eval_rtd_loss_constant=0.41, eval_rtd_auc=0.6125,
                      eval_disc_acc_replaced=0.007, eval_disc_acc_original=0.999, probe_task="mr",
                      probe_accuracy=0.55, probe_majority=0.5, health_mean_cosine=0.95, health_effective_rank=1.5,
                      health_unit_std=0.01)
    summary = learning_summary(records, entropy=6.5)
    assert summary["held_out"]["step"] == 4 and summary["held_out"]["eval_rtd_auc"] == 0.6125
    assert summary_lines(summary) == [
        "summary (held-out, step 4): deepest generator head (layer 3) MLM loss 6.250 nats (accuracy 0.125), 0.250 "
        "below the unigram entropy of the training tokens (6.500)",
        "summary (held-out, step 4): discriminator RTD AUC 0.613 (0.5 = chance); RTD loss 0.395, 0.015 below the "
        "best constant guess (0.410); accuracy on replaced tokens 0.007, on original tokens 0.999",
        "summary (held-out, step 4): linear probe on frozen discriminator features, mr dev accuracy 0.550 against "
        "0.500 for the majority class",
        "summary (held-out, step 4): discriminator token states COLLAPSED: mean cosine 0.950 (collapsed from 0.97), "
        "effective rank 1.5 (collapsed below 2), per-unit std 0.010"]
    assert learning_summary(records[:1], entropy=6.5)["held_out"] is None  # never evaluated: the training lines
