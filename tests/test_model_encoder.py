"""The encoder against PyTorch's own post-LayerNorm Transformer layer, the relative bias's structure, attention
dropout, and the model's forward in bf16."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from amos_ds.config import get_preset
from amos_ds.model import AMOSModel, Encoder, RelativePositionBias, relative_position_bucket
from amos_ds.vocab import AMOS_DS_MASK, IGNORE_INDEX

TINY = get_preset("tiny", dropout=0.0, attention_dropout=0.0)


def test_encoder_is_post_layernorm_bert_with_the_relative_bias():
    """Embeddings = LN(tokens + positions); each layer = torch.nn.TransformerEncoderLayer (post-LN, GELU) with the
    relative bias and the padding as its additive attention mask."""
    torch.manual_seed(0)
    encoder = Encoder(TINY, 2, 0.0, 0.0).eval()
    tokens = torch.randn(2, 9, TINY.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        outputs = encoder(tokens, mask)
        embeddings = encoder.embeddings
        hidden = F.layer_norm(tokens + embeddings.positions.weight[:9], (TINY.hidden_size,), embeddings.norm.weight,
                              embeddings.norm.bias, TINY.layer_norm_eps)
        bias = embeddings.relative_bias(9) + torch.zeros(2, 1, 1, 9).masked_fill(mask[:, None, None, :] == 0, -1e30)
        attn_mask = bias.expand(2, TINY.num_heads, 9, 9).reshape(2 * TINY.num_heads, 9, 9)
        for layer, output in zip(encoder.layers, outputs):
            reference = nn.TransformerEncoderLayer(TINY.hidden_size, TINY.num_heads, TINY.ffn_size, dropout=0.0,
                                                   activation="gelu", layer_norm_eps=TINY.layer_norm_eps,
                                                   batch_first=True)  # train(): not the fused fast path
            reference.self_attn.in_proj_weight.copy_(layer.attention.qkv.weight)
            reference.self_attn.in_proj_bias.copy_(layer.attention.qkv.bias)
            reference.self_attn.out_proj.load_state_dict(layer.attention.out.state_dict())
            reference.linear1.load_state_dict(layer.ffn_in.state_dict())
            reference.linear2.load_state_dict(layer.ffn_out.state_dict())
            reference.norm1.load_state_dict(layer.attention_norm.state_dict())
            reference.norm2.load_state_dict(layer.ffn_norm.state_dict())
            hidden = reference(hidden, src_mask=attn_mask)
            torch.testing.assert_close(output, hidden, rtol=1e-5, atol=1e-5)


def test_relative_bias_depends_on_the_signed_distance_only():
    torch.manual_seed(0)
    module = RelativePositionBias(TINY.rel_buckets, TINY.rel_max_distance, TINY.num_heads)
    bias = module(40)[0]
    for i in range(39):
        assert torch.equal(bias[:, i + 1, 1:], bias[:, i, :-1])  # query i, key j: a function of j - i
    buckets = relative_position_bucket(torch.arange(-39, 40), TINY.rel_buckets, TINY.rel_max_distance)
    for distance in (1, 3, 10, 39):  # keys after the query and keys before it take different rows of the table
        assert buckets[39 + distance] == -buckets[39 - distance] != 0
        assert not torch.equal(bias[:, 0, distance], bias[:, distance, 0])


def test_relative_bucket_follows_its_formula_at_every_distance():
    for num_buckets, max_distance in ((16, 32), (32, 128)):
        half = num_buckets // 2
        max_exact = half // 2
        for distance in range(0, 300):
            expected = distance if distance < max_exact else min(half - 1, max_exact + math.ceil(
                math.log(distance / max_exact) / math.log((max_distance - 1) / max_exact) * (half - 1 - max_exact)))
            got = relative_position_bucket(torch.tensor([distance]), num_buckets, max_distance).item()
            assert got == expected, (num_buckets, max_distance, distance)


def test_attention_dropout_acts_in_training_only():
    torch.manual_seed(0)
    dropping = Encoder(TINY.replace(attention_dropout=0.5), 1, 0.0, 0.5)
    plain = Encoder(TINY, 1, 0.0, 0.0)
    plain.load_state_dict(dropping.state_dict())
    tokens, mask = torch.randn(2, 7, TINY.hidden_size), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        assert not torch.equal(dropping(tokens, mask)[-1], dropping(tokens, mask)[-1])
        dropping.eval()
        torch.testing.assert_close(dropping(tokens, mask)[-1], plain.eval()(tokens, mask)[-1], rtol=0, atol=0)


def test_bf16_model_computes_in_bf16():
    """What DeepSpeed's bf16 mode does to the module: every parameter and the forward in bf16, the loss finite."""
    torch.manual_seed(0)
    model = AMOSModel(TINY).to(torch.bfloat16)
    input_ids = torch.randint(5, TINY.vocab_size, (2, 12))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 3:6] = input_ids[:, 3:6]
    input_ids[:, 3:6] = AMOS_DS_MASK
    hidden = []
    model.discriminator.register_forward_hook(lambda module, args, output: hidden.append(output[-1]))
    out = model(input_ids, torch.ones_like(input_ids), labels, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert hidden[0].dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.token_embedding.grad.dtype == torch.bfloat16
