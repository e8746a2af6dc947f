"""The training step's fast path: fused attention with the relative bias, the loader's static inputs (no waiting for
the device), and torch.compile; each against the plain computation it replaces."""

import math

import pytest
import torch
import torch.nn.functional as F

from amos_ds.config import get_preset
from amos_ds.model import AMOSModel, relative_position_bucket
from amos_ds.model.encoder import Encoder, FlexBias
from amos_ds.pretrain import should_compile
from amos_ds.train.model_inputs import model_inputs
from amos_ds.vocab import AMOS_DS_MASK, AMOS_DS_PAD, IGNORE_INDEX

TINY = get_preset("tiny", dropout=0.0, attention_dropout=0.0)
CUDA = torch.cuda.is_available()


def make_batch(config, padded: bool, batch=3, seq_len=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    original = torch.randint(5, config.vocab_size, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        attention_mask[1, seq_len - 6:] = 0
    original[attention_mask == 0] = AMOS_DS_PAD
    masked = (torch.rand(batch, seq_len, generator=generator) < 0.3) & attention_mask.bool()
    labels = torch.where(masked, original, torch.full_like(original, IGNORE_INDEX))
    input_ids = torch.where(masked, torch.full_like(original, AMOS_DS_MASK), original)
    return input_ids, attention_mask, labels


def static_inputs(input_ids, attention_mask, labels):
    """What the loader hands the model: flat masked positions, and no mask when nothing is padding."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "masked_positions": (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1),
             "has_padding": bool((attention_mask == 0).any())}
    return model_inputs(batch, torch.device("cpu"))


def reference_encoder(encoder: Encoder, token_embeds, attention_mask):
    """The encoder written out: explicit softmax(QK^T / sqrt(d) + relative bias + padding) V in every layer."""
    embeddings = encoder.embeddings
    batch, seq_len, hidden = token_embeds.shape
    x = embeddings.norm(token_embeds + embeddings.positions.weight[:seq_len])
    positions = torch.arange(seq_len, device=token_embeds.device)
    relative = positions[None, :] - positions[:, None]
    table = embeddings.relative_bias
    # Table rows in the authors' order: bucket minus its minimum, -(num_buckets // 2 - 1).
    buckets = relative_position_bucket(relative, table.num_buckets, table.max_distance) + table.num_buckets // 2 - 1
    bias = table.table.weight[buckets].permute(2, 0, 1)[None]  # [1, heads, T, T]
    if attention_mask is not None:
        bias = bias + torch.where(attention_mask == 0, float("-inf"), 0.0)[:, None, None, :]
    for layer in encoder.layers:
        heads = layer.attention.num_heads
        q, k, v = layer.attention.qkv(x).view(batch, seq_len, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, seq_len, hidden)
        x = layer.attention_norm(x + layer.attention.out(attended))
        x = layer.ffn_norm(x + layer.ffn_out(F.gelu(layer.ffn_in(x))))
    return x


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_attention_equals_explicit_softmax_with_relative_bias(impl, padded):
    # PyTorch runs FlexAttention's backward only on CUDA (compiled there, in fp32); elsewhere float64 on the CPU.
    device, dtype, tol = ("cuda", torch.float32, 2e-3) if impl == "flex" and CUDA else ("cpu", torch.float64, 1e-9)
    config = TINY.replace(attention_impl=impl)
    torch.manual_seed(0)
    encoder = Encoder(config, num_layers=2, dropout=0.0, attention_dropout=0.0).to(device, dtype)
    input_ids, attention_mask, _ = make_batch(config, padded)
    attention_mask = attention_mask.to(device)
    token_embeds = torch.randn(*input_ids.shape, config.hidden_size, dtype=dtype, device=device)
    mask = attention_mask if padded else None
    expected = reference_encoder(encoder, token_embeds, mask)
    assert isinstance(encoder.embeddings(token_embeds, mask)[1], FlexBias) == (impl == "flex")  # the path asked for
    backward = impl == "sdpa" or CUDA
    with torch.set_grad_enabled(backward):
        got = encoder(token_embeds, mask)[-1]
    real = attention_mask.bool()  # padded query rows attend normally; compare where tokens are
    torch.testing.assert_close(got[real], expected[real], rtol=tol, atol=tol)
    if not backward:
        return
    weight = torch.randn_like(expected)
    params = [encoder.embeddings.relative_bias.table.weight, *encoder.layers[0].attention.parameters()]
    got_grads = torch.autograd.grad((got[real] * weight[real]).sum(), params)
    expected_grads = torch.autograd.grad((expected[real] * weight[real]).sum(), params)
    assert got_grads[0].abs().sum() > 0  # the relative-bias table is learned through the fused kernel
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_gets_a_contiguous_bias_and_no_per_batch_mask_without_padding(monkeypatch, padded, dtype):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = AMOSModel(TINY).to(dtype)
    model(**static_inputs(*make_batch(TINY, padded)), seed=1)
    assert len(seen) == TINY.gen_layers + TINY.disc_layers
    for mask in seen:
        # What PyTorch's fused CUDA kernels require: contiguous, and in the queries' dtype.
        assert mask.stride(-1) == 1 and mask.is_contiguous() and mask.dtype == dtype
        assert mask.shape[0] == (3 if padded else 1)  # one [1, heads, T, T] bias shared by the batch


@pytest.mark.parametrize("padded", [False, True])
def test_static_inputs_give_the_outputs_and_gradients_of_the_plain_call(padded):
    torch.manual_seed(0)
    model = AMOSModel(TINY)
    input_ids, attention_mask, labels = make_batch(TINY, padded)
    plain = model(input_ids, attention_mask, labels, seed=5)
    static = model(**static_inputs(input_ids, attention_mask, labels), seed=5)
    assert torch.equal(plain.replaced, static.replaced)
    torch.testing.assert_close(plain.head_losses, static.head_losses, rtol=0, atol=0)
    torch.testing.assert_close(plain.rtd_loss, static.rtd_loss, rtol=1e-6, atol=1e-7)
    assert plain.metrics.keys() == static.metrics.keys()
    for name in plain.metrics:
        torch.testing.assert_close(plain.metrics[name], static.metrics[name], rtol=1e-6, atol=1e-7, msg=name)
    params = list(model.parameters())
    for g, e in zip(torch.autograd.grad(static.loss, params), torch.autograd.grad(plain.loss, params), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)  # fp32: the two calls sum in another order


def test_metrics_keep_their_meaning():
    model = AMOSModel(TINY)
    input_ids, attention_mask, labels = make_batch(TINY, padded=True)
    out = model(**static_inputs(input_ids, attention_mask, labels), seed=2)
    # Recompute the RTD logits with the same model: dropout is off, so the forward is deterministic.
    replaced, real, masked = out.replaced, attention_mask.bool(), labels != IGNORE_INDEX
    assert not replaced[~masked].any()
    logits = []
    hook = model.rtd_head.register_forward_hook(lambda module, args, output: logits.append(output.squeeze(-1)))
    model(**static_inputs(input_ids, attention_mask, labels), seed=2)
    hook.remove()
    predicted = logits[0] > 0
    share = replaced[real].float().mean()
    on_replaced, on_original = real & replaced, real & ~replaced
    expected = {"disc_acc_replaced": (predicted[on_replaced] == replaced[on_replaced]).float().mean(),
                "disc_acc_original": (predicted[on_original] == replaced[on_original]).float().mean(),
                "replaced_frac": replaced[masked].float().mean(),
                "rtd_loss_constant": F.binary_cross_entropy(share, share),
                "rtd_loss": F.binary_cross_entropy_with_logits(logits[0][real].float(), replaced[real].float())}
    assert on_replaced.any() and on_original.any()
    for name, value in expected.items():
        torch.testing.assert_close(out.metrics[name], value.float(), msg=name)


def test_forward_and_backward_compile_into_one_graph():
    """fullgraph=True fails on any graph break: a data-dependent shape, an .item() or a boolean selection."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AMOSModel(TINY)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for padded in (False, True):
        inputs = static_inputs(*make_batch(TINY, padded))
        out = compiled(**inputs, seed=3)
        out.loss.backward()
        expected = model(**inputs, seed=3)
        torch.testing.assert_close(out.loss, expected.loss)


def test_compiled_layers_step_equals_eager_step():
    """compile_layers() (inductor, as training uses it) against eager in fp32: loss, metrics and every gradient."""
    torch._dynamo.reset()
    inputs = static_inputs(*make_batch(TINY, padded=False))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = AMOSModel(TINY)
        if compiled:
            assert model.compile_layers() == TINY.gen_layers + TINY.disc_layers
        out = model(**inputs, seed=4)
        out.loss.backward()
        results.append((out.metrics, [p.grad for p in model.parameters()]))
    (eager_metrics, eager_grads), (compiled_metrics, compiled_grads) = results
    for name in eager_metrics:
        torch.testing.assert_close(compiled_metrics[name], eager_metrics[name], rtol=1e-5, atol=1e-6, msg=name)
    for c, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_flex_needs_attention_dropout_off_and_compile_auto_means_cuda():
    with pytest.raises(ValueError, match="attention_impl.*attention_dropout"):
        get_preset("tiny", attention_impl="flex")
    with pytest.raises(ValueError, match="attention_impl"):
        get_preset("tiny", attention_impl="xformers")
    assert should_compile("auto", "cuda", 1) and not should_compile("auto", "cuda", 3)
    assert not should_compile("auto", "cpu", 0) and should_compile("on", "cpu", 3)
    assert not should_compile("off", "cuda", 0)
