"""Held-out evaluation: the metrics against hand-computed values, the held-out slice, exact repeatability, and
one rank against two; representation health and its collapse warning."""

import math

import numpy as np
import pytest
import torch
from conftest import run_on_two_ranks, text_corpus

from amos_ds.config import get_preset
from amos_ds.data import DataConfig, open_corpora
from amos_ds.data.held_out import held_out_batches, split_held_out
from amos_ds.model import AMOSModel, AMOSOutput
from amos_ds.train.evaluate import batch_part, eval_metrics, evaluate, held_out_split, roc_auc
from amos_ds.train.health import collapse_warning, representation_health

TEXT = "".join(f"Line {i} tells how the {'cat' if i % 3 else 'dog'} sat on mat {i % 7} near {i % 11}.\n\n"
               for i in range(400))
SEQ_LEN, MICRO_BATCH = 32, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("evaluate"), TEXT)


def test_roc_auc_counts_pairs_with_ties_as_half():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    positive = np.array([0, 0, 1, 1, 1])
    # positives 0.35, 0.8, 0.4 against negatives 0.1, 0.4: 0.35 beats 1, 0.8 beats 2, 0.4 beats 1 and ties 1 -> 4.5/6
    assert roc_auc(scores, positive) == pytest.approx(4.5 / 6, abs=1e-15)
    assert roc_auc(np.array([1.0, 2.0]), np.array([1, 1])) is None


def test_eval_metrics_match_hand_computed_values_on_a_constructed_batch():
    # One sequence of 6 tokens, the last one padding; tokens 1 and 3 masked (originals 7 and 9); two heads.
    batch = {"labels": torch.tensor([[-100, 7, -100, 9, -100, -100]]), "masked_positions": torch.tensor([1, 3]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    replaced = torch.tensor([[False, True, False, False, False, False]])  # the sample at 3 equalled its original
    output = AMOSOutput(loss=torch.tensor(0.0), head_losses=torch.tensor([2.0, 1.0]), rtd_loss=torch.tensor(0.0),
                        replaced=replaced, metrics={}, rtd_logits=torch.tensor([[-1.0, 2.0, 2.0, -2.0, -3.0, 9.0]]),
                        disc_states=torch.zeros(1, 6, 4), head_predictions=torch.tensor([[7, 5], [7, 9]]))
    metrics = eval_metrics([batch_part(output, batch)], head_layers=(2, 4))
    logits, labels = [-1.0, 2.0, 2.0, -2.0, -3.0], [0, 1, 0, 0, 0]  # the five real tokens
    bce = [math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x)) for x, y in zip(logits, labels)]
    expected = {"eval_mlm_loss": 3.0, "eval_mlm_loss_L2": 2.0, "eval_mlm_loss_L4": 1.0,
                "eval_mlm_acc_L2": 0.5, "eval_mlm_acc_L4": 1.0,  # head 2 predicted 5 for 9
                "eval_rtd_loss": sum(bce) / 5, "eval_rtd_loss_constant": -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)),
                "eval_rtd_auc": 3.5 / 4,  # the replaced token (2.0) beats -1, -2, -3 and ties the other 2.0
                "eval_disc_acc_replaced": 1.0, "eval_disc_acc_original": 0.75, "eval_replaced_frac": 0.5,
                "eval_tokens": 5}
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-12), name


def test_held_out_slice_is_disjoint_from_training_and_fixed(corpus):
    dataset = open_corpora([str(corpus)], SEQ_LEN, seed=3)
    count = 4 * MICRO_BATCH
    training, held_out = split_held_out(dataset, count)
    held = [held_out.dataset_index(i) for i in range(len(held_out))]
    trained = [training.dataset_index(i) for i in range(len(training))]
    assert held == [k * len(dataset) // count for k in range(count)]  # spread evenly, a function of N and count
    assert sorted(held + trained) == list(range(len(dataset))) and not set(held) & set(trained)
    assert np.array_equal(training[5], dataset[trained[5]]) and np.array_equal(held_out[3], dataset[held[3]])
    # The same micro-batches, whichever rank evaluates them.
    config = DataConfig(seq_len=SEQ_LEN, seed=3)
    alone = dict(held_out_batches(held_out, MICRO_BATCH, 0, 1, config))
    shared = {**dict(held_out_batches(held_out, MICRO_BATCH, 0, 2, config)),
              **dict(held_out_batches(held_out, MICRO_BATCH, 1, 2, config))}
    assert sorted(alone) == sorted(shared) == [0, 1, 2, 3]
    for number, batch in alone.items():
        assert all(torch.equal(batch[name], shared[number][name]) for name in ("input_ids", "labels"))
    assert split_held_out(dataset, 0)[0].dataset_index(7) == 7


def evaluate_tiny(corpus, rank_count_check: int) -> dict:
    """Evaluate a freshly initialised tiny model (dropout on, so eval mode matters) on the held-out slice."""
    torch.set_num_threads(1)
    dataset = open_corpora([str(corpus)], SEQ_LEN, seed=3)
    _, held_out = split_held_out(dataset, 4 * MICRO_BATCH)
    torch.manual_seed(0)
    config = get_preset("tiny").replace(vocab_size=dataset.vocab_size, vocab_impl="torch")
    model = AMOSModel(config)
    assert torch.distributed.get_world_size() == rank_count_check
    metrics = evaluate(model, torch.device("cpu"), held_out, MICRO_BATCH, DataConfig(seq_len=SEQ_LEN, seed=3),
                       config.head_layers, progress=0.5)
    assert model.training  # left as it was
    metrics.pop("eval_time_s")
    return metrics


def test_two_evaluations_of_the_same_weights_agree_exactly(corpus, one_process_group):
    threads = torch.get_num_threads()
    try:
        first, second = evaluate_tiny(corpus, 1), evaluate_tiny(corpus, 1)
    finally:
        torch.set_num_threads(threads)
    assert first == second
    assert 0.0 < first["eval_rtd_auc"] < 1.0 and first["health_mean_cosine"] < 0.9


@pytest.mark.slow
def test_evaluation_on_two_ranks_equals_one_rank(corpus, one_process_group, tmp_path):
    threads = torch.get_num_threads()
    try:
        alone = evaluate_tiny(corpus, 1)
    finally:
        torch.set_num_threads(threads)
    (rank0, _), (rank1, _) = run_on_two_ranks(evaluate_tiny, [(corpus, 2), (corpus, 2)], tmp_path)
    assert rank0.keys() == alone.keys()
    for name, value in alone.items():  # the same per-token numbers, pooled in another order
        assert rank0[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert {name: rank1[name] for name in rank1} == {name: rank0[name] for name in rank1}
    assert "health_mean_cosine" not in rank1  # rank 0 measures health, on micro-batch 0


def test_identical_token_states_are_reported_as_collapsed():
    collapsed = representation_health(torch.tensor([[0.3, -1.2, 0.5, 2.0]]).repeat(6, 1))
    assert collapsed == {"health_mean_cosine": pytest.approx(1.0, abs=1e-12),
                         "health_effective_rank": pytest.approx(1.0, abs=1e-9), "health_unit_std": 0.0}
    assert collapse_warning(collapsed).startswith("warning: the discriminator's token states have collapsed")
    # Orthogonal states: cosine 0, four equal singular values, each unit's std over 4 tokens sqrt(1/4) = 0.5.
    healthy = representation_health(torch.eye(4))
    assert healthy == {"health_mean_cosine": pytest.approx(0.0, abs=1e-12),
                       "health_effective_rank": pytest.approx(4.0, rel=1e-12),
                       "health_unit_std": pytest.approx(0.5, rel=1e-12)}
    assert collapse_warning(healthy) is None
    # Nearly parallel states (the project's collapsed model had a mean cosine of 0.989) cross the threshold too.
    torch.manual_seed(0)
    parallel = torch.randn(1, 32) + 0.05 * torch.randn(64, 32)
    assert collapse_warning(representation_health(parallel)) is not None
    assert collapse_warning(representation_health(torch.randn(64, 32))) is None


def test_held_out_split_takes_at_most_a_tenth_of_the_data_or_the_eval_data(corpus):
    dataset = open_corpora([str(corpus)], SEQ_LEN, seed=3)
    batch = len(dataset) // 25  # a tenth of the data holds two such batches
    training, held_out = held_out_split(dataset, [], eval_batches=8, global_batch=batch, seed=3)
    assert len(held_out) == 2 * batch and len(training) == len(dataset) - 2 * batch
    training, held_out = held_out_split(dataset, [], eval_batches=0, global_batch=batch, seed=3)
    assert held_out is None and len(training) == len(dataset)
    training, held_out = held_out_split(dataset, [str(corpus)], eval_batches=3, global_batch=4, seed=3)
    assert len(training) == len(dataset) and len(held_out) == 12  # --eval-data: training reads all of --data
