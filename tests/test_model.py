"""The AMOS model: where each gradient goes, the labels, and what each ablation switch changes."""

import math

import pytest
import torch
import torch.nn.functional as F

from amos_ds.config import get_preset, with_ablation
from amos_ds.finetune.pretrained import TextEncoder, encoder_state
from amos_ds.model import AMOSModel, RelativePositionBias, relative_position_bucket
from amos_ds.model import amos as amos_module
from amos_ds.vocab import AMOS_DS_MASK, AMOS_DS_PAD, IGNORE_INDEX

TINY = get_preset("tiny", dropout=0.0, attention_dropout=0.0)


def make_batch(config, batch=4, seq_len=24, seed=0, mask_prob=0.3):
    generator = torch.Generator().manual_seed(seed)
    original = torch.randint(5, config.vocab_size, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[0, seq_len - 5:] = 0
    original[attention_mask == 0] = AMOS_DS_PAD
    masked = (torch.rand(batch, seq_len, generator=generator) < mask_prob) & attention_mask.bool()
    labels = torch.where(masked, original, torch.full_like(original, IGNORE_INDEX))
    input_ids = torch.where(masked, torch.full_like(original, AMOS_DS_MASK), original)
    return input_ids, attention_mask, labels


def build(config, seed=0):
    torch.manual_seed(seed)
    return AMOSModel(config)


def grads(loss, params):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


def generator_layer_params(model, layer):
    """Parameters of 1-based generator layer `layer`."""
    return list(model.generators[0].layers[layer - 1].parameters())


def is_zero(tensors):
    return all(torch.count_nonzero(t) == 0 for t in tensors)


def assert_negated(got, want, rtol=1e-5):
    """`got` is -`want` to `rtol` of want's largest entry, and therefore far from `want` itself (the gradients here
    are about 1e-8: an absolute tolerance would accept either sign)."""
    scale = want.abs().max().item()
    assert scale > 0, "no gradient at all: nothing was tested"
    assert (got + want).abs().max().item() <= rtol * scale, "not the negated gradient"
    assert (got - want).abs().max().item() >= scale, "the un-reversed gradient"


def test_relative_position_buckets_match_hand_table():
    # 16 buckets, max distance 32: half = 8, exact below 4, then ceil(log(d/4)/log(31/4) * 3) above 4, capped at 7.
    distances = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 20, 31, 32, 100])
    expected = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7, 7])
    assert torch.equal(relative_position_bucket(distances, 16, 32), expected)
    assert torch.equal(relative_position_bucket(-distances, 16, 32), -expected)
    # 32 buckets, max distance 128 (the default): exact below 8, capped at 15.
    distances = torch.tensor([7, 8, 9, 12, 16, 32, 64, 127, 500])
    assert torch.equal(relative_position_bucket(distances, 32, 128), torch.tensor([7, 8, 9, 10, 10, 12, 14, 15, 15]))

    # 64 buckets, max distance 128 (base, base++ and the authors' checkpoint): exact below 16, capped at 31.
    distances = torch.tensor([15, 16, 17, 20, 32, 64, 127, 128, 511])
    assert torch.equal(relative_position_bucket(distances, 64, 128),
                       torch.tensor([15, 16, 17, 18, 22, 27, 31, 31, 31]))


def test_relative_bias_rows_in_the_authors_order():
    # The authors index their table with bucket - min(bucket) = bucket + 31 for 64 buckets: row 0 holds the farthest
    # keys to the left, row 31 distance 0, row 62 the farthest to the right; row 63 is never read.
    bias = RelativePositionBias(64, 128, num_heads=2)
    with torch.no_grad():
        bias.table.weight.copy_(torch.arange(64.0)[:, None] * torch.tensor([1.0, -1.0]))
    rows = bias(300)[0, 0]  # [query, key]
    for query, key, row in [(0, 0, 31), (0, 1, 32), (1, 0, 30), (0, 16, 47), (20, 0, 13), (0, 127, 62),
                            (0, 299, 62), (299, 0, 0), (150, 22, 0)]:
        assert rows[query, key].item() == row, (query, key)
    assert torch.equal(bias(300)[0, 1], -rows)
    assert get_preset("base").rel_buckets == get_preset("base_plus_plus").rel_buckets == 64
    assert get_preset("base").rel_max_distance == get_preset("base_plus_plus").rel_max_distance == 128


@pytest.mark.parametrize("vocab_impl", ["torch", "chunked"])
def test_reversed_gradient_reaches_mixture_and_generator_but_not_mlm_head(monkeypatch, vocab_impl):
    config = TINY.replace(vocab_impl=vocab_impl)
    model = build(config)
    batch = make_batch(config)
    out = model(*batch, seed=3)
    scorer, generator = list(model.mixture_scorer.parameters()), list(model.generators.parameters())
    mlm_head = list(model.mlm_head.parameters())
    reversed_grads = grads(out.rtd_loss, scorer + generator + mlm_head)  # one backward pass for all of them
    assert not is_zero(reversed_grads[:len(scorer)])
    assert is_zero(reversed_grads[len(scorer) + len(generator):])  # neither the head transform nor the output bias
    by_param = dict(zip(generator, reversed_grads[len(scorer):]))
    for layer in config.head_layers:  # every block, through f(d)
        assert not is_zero([by_param[p] for p in generator_layer_params(model, layer)])

    # The un-reversed graph: the same forward with the straight-through gradient passed on unchanged.
    original = amos_module.ops.mlm_and_sample
    monkeypatch.setattr(amos_module.ops, "mlm_and_sample",
                        lambda *args, grad_scale, **kwargs: original(*args, grad_scale=1.0, **kwargs))
    plain = model(*batch, seed=3)
    torch.testing.assert_close(plain.rtd_loss, out.rtd_loss, rtol=0, atol=0)
    for got, want in zip(reversed_grads, grads(plain.rtd_loss, scorer + generator)):
        assert_negated(got, want)


def test_stop_gradient_confines_each_head_loss_to_its_block():
    model = build(TINY)  # heads at layers 1, 2, 3: block k is layer k
    out = model(*make_batch(TINY), seed=1)
    layers = TINY.head_layers
    for k, layer in enumerate(layers):
        for other in layers:
            reached = not is_zero(grads(out.head_losses[k], generator_layer_params(model, other)))
            assert reached == (other == layer), f"head {layer} loss reaching layer {other}"
        assert not is_zero(grads(out.head_losses[k], [model.token_embedding]))
        assert is_zero(grads(out.head_losses[k], list(model.discriminator.parameters())))


def test_without_stop_gradient_deep_heads_train_lower_blocks():
    config = with_ablation(TINY, "no_stop_grad")
    model = build(config)
    out = model(*make_batch(config), seed=1)
    assert not is_zero(grads(out.head_losses[2], generator_layer_params(model, 1)))


def test_discriminator_sees_samples_and_labels_equal_samples_as_original():
    model = build(TINY)
    input_ids, attention_mask, labels = make_batch(TINY)
    masked = labels != IGNORE_INDEX
    # Every masked position holds token 7, and the output bias makes token 7 all but certain.
    labels = torch.where(masked, torch.full_like(labels, 7), labels)
    with torch.no_grad():
        model.mlm_head.bias[7] = 1e4
    out = model(input_ids, attention_mask, labels, seed=0)
    assert masked.any() and not out.replaced.any()
    assert out.metrics["replaced_frac"].item() == 0.0

    # With no such bias, samples differ from the originals and exactly those positions are labelled replaced.
    captured = {}
    original = amos_module.ops.mlm_and_sample

    def capture(*args, **kwargs):
        captured["result"] = original(*args, **kwargs)
        captured["embedding"] = args[2]
        return captured["result"]

    model = build(TINY)
    amos_module.ops.mlm_and_sample = capture
    try:
        out = model(*make_batch(TINY), seed=4)
    finally:
        amos_module.ops.mlm_and_sample = original
    _, sampled_ids, sampled_embeds = captured["result"]
    assert torch.equal(sampled_embeds, captured["embedding"][sampled_ids])
    _, _, labels = make_batch(TINY)
    masked = labels != IGNORE_INDEX
    assert torch.equal(out.replaced[masked], sampled_ids != labels[masked])
    assert not out.replaced[~masked].any()


def test_uniform_mixture_has_equal_weights_and_no_scorer():
    config = with_ablation(TINY, "no_adv_train")
    model = build(config)
    out = model(*make_batch(config), seed=0)
    assert model.mixture_scorer is None
    for layer in config.head_layers:
        assert out.metrics[f"mix_weight_L{layer}"].item() == pytest.approx(1 / 3, abs=1e-7)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_random_layer_picks_one_head_per_position_uniformly():
    config = with_ablation(TINY, "random_layer")
    model = build(config)
    features = torch.randn(3, 6000, config.hidden_size)
    gamma = torch.softmax(model.mixture_logits(features, seed=11, progress=0.0), dim=-1)
    assert torch.equal(gamma.sum(-1), torch.ones(6000)) and set(gamma.unique().tolist()) == {0.0, 1.0}
    shares = gamma.mean(0)
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02)
    assert torch.equal(gamma, torch.softmax(model.mixture_logits(features, seed=11, progress=0.9), dim=-1))
    assert not torch.equal(gamma, torch.softmax(model.mixture_logits(features, seed=12, progress=0.0), dim=-1))
    # Through the forward: each head's weight is the share of masked positions it was drawn for.
    input_ids, attention_mask, labels = make_batch(config)
    out = model(input_ids, attention_mask, labels, seed=11)
    counts = [out.metrics[f"mix_weight_L{layer}"].item() * (labels != IGNORE_INDEX).sum().item()
              for layer in config.head_layers]
    assert counts == pytest.approx([round(c) for c in counts], abs=1e-4) and sum(map(round, counts)) == sum(counts)


def test_layer_switch_follows_training_progress():
    config = with_ablation(TINY, "layer_switch")
    model = build(config)
    features = torch.randn(3, 5, config.hidden_size)
    for progress, head in ((0.0, 0), (0.3, 0), (1 / 3, 1), (0.34, 1), (0.66, 1), (2 / 3, 2), (0.67, 2), (1.0, 2)):
        gamma = torch.softmax(model.mixture_logits(features, seed=0, progress=progress), dim=-1)
        assert torch.equal(gamma, torch.nn.functional.one_hot(torch.full((5,), head), 3).float()), progress


def test_adversarial_mlm_lets_the_rtd_gradient_reach_the_mlm_head():
    config = with_ablation(TINY, "adv_mlm")
    model = build(config)
    out = model(*make_batch(config), seed=3)
    assert not is_zero(grads(out.rtd_loss, list(model.mlm_head.parameters())))


def test_separate_generators_and_single_generator_shapes():
    config = with_ablation(TINY, "separate_generators")
    model = build(config)
    assert [len(g.layers) for g in model.generators] == list(config.head_layers)
    out = model(*make_batch(config), seed=0)
    # Each head's loss trains only its own generator.
    for k in range(3):
        for j, generator in enumerate(model.generators):
            assert is_zero(grads(out.head_losses[k], list(generator.layers.parameters()))) == (j != k)

    single = with_ablation(get_preset("base"), "single_gen_6")
    assert (single.gen_layers, single.head_layers, single.mixture) == (6, (6,), "uniform")


def test_head_layer_sets_from_table_9():
    for head_layers in ((4, 8), (2, 4, 6, 8), tuple(range(1, 9))):
        config = get_preset("tiny", gen_layers=8, head_layers=head_layers, dropout=0.0, attention_dropout=0.0)
        out = build(config)(*make_batch(config), seed=0)
        assert out.head_losses.shape == (len(head_layers),)
        assert set(out.metrics) >= {f"mix_weight_L{layer}" for layer in head_layers}


def test_forward_reports_every_metric_and_loss_formula():
    model = build(TINY)
    out = model(*make_batch(TINY), seed=0)
    expected = {"loss", "mlm_loss", "rtd_loss", "rtd_loss_constant", "disc_acc_replaced", "disc_acc_original",
                "replaced_frac",
                "mlm_loss_L1", "mlm_loss_L2", "mlm_loss_L3", "mix_weight_L1", "mix_weight_L2", "mix_weight_L3"}
    assert set(out.metrics) == expected
    torch.testing.assert_close(out.loss, out.head_losses.sum() + 50.0 * out.rtd_loss)
    assert sum(out.metrics[f"mix_weight_L{k}"].item() for k in (1, 2, 3)) == pytest.approx(1.0, abs=1e-6)


def test_batch_without_masked_tokens_gives_zero_mlm_loss():
    model = build(TINY)
    input_ids, attention_mask, labels = make_batch(TINY)
    out = model(input_ids, attention_mask, torch.full_like(labels, IGNORE_INDEX), seed=0)
    assert torch.equal(out.head_losses, torch.zeros(3))
    assert not out.replaced.any() and torch.isfinite(out.loss)


def sequences_with_masks(config):
    """Two sequences of ordinary tokens, 20 and 13 long, with their labels (a few masked positions each)."""
    generator = torch.Generator().manual_seed(8)
    rows = []
    for length, masked_positions in ((20, [2, 5, 11, 17]), (13, [1, 6, 12])):
        original = torch.randint(5, config.vocab_size, (length,), generator=generator)
        labels = torch.full_like(original, IGNORE_INDEX)
        labels[masked_positions] = original[masked_positions]
        input_ids = torch.where(labels != IGNORE_INDEX, torch.full_like(original, AMOS_DS_MASK), original)
        rows.append((input_ids, labels))
    return rows


def pad_rows(rows, length, filler):
    """[B, length] input_ids, attention_mask, labels; padded positions hold `filler` (ids) and IGNORE_INDEX."""
    input_ids = torch.stack([torch.cat([ids, filler[len(ids):length]]) for ids, _ in rows])
    labels = torch.stack([torch.cat([lab, torch.full((length - len(lab),), IGNORE_INDEX)]) for _, lab in rows])
    attention_mask = torch.stack([(torch.arange(length) < len(ids)).long() for ids, _ in rows])
    return input_ids, attention_mask, labels


def unpadded(row):
    """The batch of one sequence, alone and unpadded."""
    input_ids, labels = row
    return input_ids[None], torch.ones_like(input_ids)[None], labels[None]


def rtd_logits_of(model, batch, seed):
    """The forward's output and the RTD head's logits [B, T], read by a hook on `model.rtd_head`."""
    captured = []
    handle = model.rtd_head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        out = model(*batch, seed=seed)
    finally:
        handle.remove()
    return out, captured[0].reshape(batch[0].shape).detach()


def test_initialisation_layer_norms_and_generator_dropout_follow_the_config():
    config = TINY.replace(layer_norm_eps=1e-3, dropout=0.1, attention_dropout=0.1)
    model = build(config)
    assert abs(model.token_embedding.std().item() - config.init_std) < 0.1 * config.init_std
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-3}
    input_ids = torch.randint(5, config.vocab_size, (2, 16))
    for shared_or_separate in (model, build(with_ablation(config, "separate_generators"))):
        trained = shared_or_separate.train().generator_features(input_ids, None)
        for got, want in zip(trained, shared_or_separate.eval().generator_features(input_ids, None), strict=True):
            torch.testing.assert_close(got, want)  # the generators have no dropout (the discriminator has)


def test_padding_changes_no_output_at_real_positions():
    """A padded batch gives each sequence the MLM losses, RTD logits and RTD loss it gets alone, unpadded, whatever
    the padded positions hold: padding is masked out of attention and out of the losses."""
    model = build(TINY)
    rows = sequences_with_masks(TINY)
    with torch.no_grad():  # every sample is token 7 (Gumbel noise is bounded), wherever the noise comes from
        model.mlm_head.bias[7] = 1e4
    alone = [rtd_logits_of(model, unpadded(row), seed=0) for row in rows]
    real = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.float32)
    for filler in (torch.full((32,), AMOS_DS_PAD), torch.randint(5, TINY.vocab_size, (32,))):
        batch = pad_rows(rows, 32, filler)
        out, logits = rtd_logits_of(model, batch, seed=0)
        for row, (_, single_logits) in enumerate(alone):
            torch.testing.assert_close(logits[row, :int(real[row])], single_logits[0], rtol=1e-5, atol=1e-5)
        rtd_losses = torch.stack([single.rtd_loss for single, _ in alone])
        torch.testing.assert_close(out.rtd_loss, (rtd_losses * real).sum() / real.sum(), rtol=1e-5, atol=0)

    # The MLM losses (mean over masked positions) do not depend on the samples: compare them without the bias, with
    # the shared generator and with the separate generators of the ablation.
    masked = torch.tensor([float((labels != IGNORE_INDEX).sum()) for _, labels in rows])
    for model in (build(TINY), build(with_ablation(TINY, "separate_generators"))):
        alone = torch.stack([model(*unpadded(row), seed=0).head_losses for row in rows])
        for filler in (torch.full((32,), AMOS_DS_PAD), torch.randint(5, TINY.vocab_size, (32,))):
            batched = model(*pad_rows(rows, 32, filler), seed=0).head_losses
            torch.testing.assert_close(batched, (alone * masked[:, None]).sum(0) / masked.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rtd_bias", [3.0, -3.0])
def test_metrics_of_a_batch_whose_answer_is_known(rtd_bias):
    """Every sample is token 7 and the discriminator says `rtd_bias > 0` ("replaced") everywhere: the labels, the
    RTD loss and both accuracies follow by hand."""
    model = build(TINY)
    rows = sequences_with_masks(TINY)
    rows[0][1][5] = 7  # one masked original is token 7: its sample equals it, so it counts as original
    input_ids, attention_mask, labels = pad_rows(rows, 24, torch.full((24,), AMOS_DS_PAD))
    with torch.no_grad():
        model.mlm_head.bias[7] = 1e4
        model.rtd_head.weight.zero_()
        model.rtd_head.bias.fill_(rtd_bias)
    out = model(input_ids, attention_mask, labels, seed=0)

    masked = labels != IGNORE_INDEX
    expected_replaced = masked & (labels != 7)
    assert torch.equal(out.replaced, expected_replaced)
    assert out.metrics["replaced_frac"].item() == pytest.approx(6 / 7, abs=1e-7)  # 7 masked, 6 replaced
    real = attention_mask.bool()
    targets = expected_replaced[real].float()
    expected_loss = F.binary_cross_entropy_with_logits(torch.full_like(targets, rtd_bias), targets)
    torch.testing.assert_close(out.rtd_loss, expected_loss)
    torch.testing.assert_close(out.metrics["rtd_loss"], expected_loss)
    share = 6 / len(targets)  # of the real tokens, 6 were replaced: the best constant guess says `share` everywhere
    assert out.metrics["rtd_loss_constant"].item() == pytest.approx(
        -(share * math.log(share) + (1 - share) * math.log(1 - share)), rel=1e-6)
    says_replaced = float(rtd_bias > 0)
    assert out.metrics["disc_acc_replaced"].item() == says_replaced
    assert out.metrics["disc_acc_original"].item() == 1.0 - says_replaced


def test_metrics_name_each_head_by_its_layer():
    """Layer switch at progress p gives all the weight to one known head; mlm_loss_L<d> is head d's own loss (the
    stop-gradient test shows which loss is whose), and the heads' losses differ."""
    config = with_ablation(TINY, "layer_switch")
    model = build(config)
    batch = make_batch(config)
    for progress, layer in ((None, 1), (0.0, 1), (0.5, 2), (0.9, 3)):
        out = model(*batch, seed=0) if progress is None else model(*batch, seed=0, progress=progress)
        for other in config.head_layers:
            assert out.metrics[f"mix_weight_L{other}"].item() == float(other == layer), (progress, other)
    assert len(set(out.head_losses.tolist())) == 3
    for k, layer in enumerate(config.head_layers):
        assert out.metrics[f"mlm_loss_L{layer}"].item() == out.head_losses[k].item()
    assert out.metrics["mlm_loss"].item() == pytest.approx(out.head_losses.sum().item(), rel=1e-6)


def test_loss_uses_the_configured_rtd_weight():
    config = TINY.replace(rtd_weight=7.0)
    out = build(config)(*make_batch(config), seed=0)
    assert out.rtd_loss.item() > 0.1
    torch.testing.assert_close(out.loss, out.head_losses.sum() + 7.0 * out.rtd_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.metrics["loss"], out.loss.detach())


def test_adversarial_mlm_gradient_is_proportional_to_the_configured_scale():
    """The "+adv MLM" ablation (scale 0.1) gives the MLM head a tenth of the RTD gradient it gets at scale 1.0."""
    config = with_ablation(TINY, "adv_mlm")
    assert config.adv_mlm_scale == 0.1
    head_grads = {}
    for scale in (0.1, 1.0):
        model = build(config.replace(adv_mlm_scale=scale))
        out = model(*make_batch(config), seed=3)
        head_grads[scale] = torch.cat([g.flatten() for g in grads(out.rtd_loss, list(model.mlm_head.parameters()))])
    assert head_grads[1.0].abs().max() > 0
    largest = head_grads[1.0].abs().max().item()
    torch.testing.assert_close(head_grads[0.1], 0.1 * head_grads[1.0], rtol=1e-4, atol=1e-4 * largest)


def test_vocab_impl_chooses_the_implementation_the_model_runs():
    """`vocab_impl` reaches the vocabulary path: "chunked" puts its hand-written backward in the graph, "torch" not."""

    def graph_names(tensor):
        names, stack, seen = set(), [tensor.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
        return names

    for impl, expected in (("chunked", True), ("torch", False)):
        config = TINY.replace(vocab_impl=impl)
        out = build(config)(*make_batch(config), seed=0)
        assert any("ChunkedVocabPath" in name for name in graph_names(out.loss)) == expected, impl


def test_rtd_loss_reads_the_last_layer_of_the_discriminator_that_fine_tuning_keeps():
    """Three discriminator layers; every sample is token 7, so the discriminator's input is known: the RTD loss is
    the RTD head on the hidden states of the encoder that `amos_ds.finetune` keeps, at real positions."""
    config = TINY.replace(disc_layers=3)
    model = build(config)
    with torch.no_grad():
        model.mlm_head.bias[7] = 1e4
    input_ids, attention_mask, labels = make_batch(config)
    out = model(input_ids, attention_mask, labels, seed=0)
    encoder = TextEncoder(config)
    encoder.load_state_dict(encoder_state(model.state_dict()))
    masked = labels != IGNORE_INDEX
    with torch.no_grad():
        hidden = encoder(torch.where(masked, torch.full_like(labels, 7), input_ids), attention_mask)
        logits = model.rtd_head(hidden).squeeze(-1)
    real = attention_mask.bool()
    expected = F.binary_cross_entropy_with_logits(logits[real], out.replaced[real].float())
    torch.testing.assert_close(out.rtd_loss, expected, rtol=1e-5, atol=1e-6)
