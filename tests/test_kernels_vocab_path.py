"""The fused Triton vocabulary path against the PyTorch reference (`amos_ds.ops.mlm_and_sample(impl="torch")`).

Every shape class runs in both layouts (`KernelConfig.layout`, the `layout` parameter). On a GPU the kernels run
compiled on CUDA; elsewhere under TRITON_INTERPRET=1 (set here before Triton is imported), with small shapes and the
interpreter's large tiles. Tolerances are relative to the largest reference entry: fp32 1e-5 forward and 5e-4
backward. bf16 inputs: "stacked_slots" keeps fp32 logits of the bf16 operands, so it is compared with the reference
run on the same values in fp32; "chunked_logits" rounds its logits and gy to bf16 as F.linear does, so it is compared
with the reference run in bf16. Either way the forward and the mixture gradient are fp32 maths on the same values
(same tolerances); the other gradients are bf16 matmuls of bf16-rounded logit gradients, returned in bf16 (2e-2).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from amos_kernels import KernelConfig, default_config, mlm_and_sample_triton  # noqa: E402
from amos_kernels.config import LAYOUTS  # noqa: E402
from amos_kernels.tile_math import gumbel  # noqa: E402

from amos_ds.ops import gumbel_noise, mlm_and_sample  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TAU = 0.3
SEED = 1234


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return request.param


def _inputs(num_heads: int, num_rows: int, hidden: int, vocab: int, dtype: torch.dtype, one_target: bool = False,
            ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(num_heads * 1000 + num_rows * 10 + vocab)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE)

    targets = torch.randint(0, vocab, (num_rows,), generator=generator).to(DEVICE)
    if one_target:
        targets.fill_(int(targets[0]))
    return dict(head_states=randn(num_heads, num_rows, hidden, scale=0.5).to(dtype),
                mix_logits=randn(num_rows, num_heads), embedding=randn(vocab, hidden, scale=0.5).to(dtype),
                bias=randn(vocab, scale=0.1).to(dtype),
                targets=targets, grad_losses=randn(num_heads), grad_sampled=randn(num_rows, hidden).to(dtype))


def _run(function, inputs: dict[str, torch.Tensor], as_fp32: bool, **kwargs) -> tuple[tuple, dict[str, torch.Tensor]]:
    """Outputs and the gradients of <grad_losses, losses> + <grad_sampled, sampled_embeds> w.r.t. the float inputs."""
    names = ("head_states", "mix_logits", "embedding", "bias")
    leaves = {name: inputs[name].detach().clone() for name in names}
    if as_fp32:
        leaves = {name: value.float() for name, value in leaves.items()}
    for value in leaves.values():
        value.requires_grad_(True)
    outputs = function(*(leaves[name] for name in names), inputs["targets"], TAU, SEED, **kwargs)
    objective = (outputs[0] * inputs["grad_losses"]).sum() + (outputs[2].float() * inputs["grad_sampled"].float()).sum()
    objective.backward()
    return outputs, {name: value.grad for name, value in leaves.items()}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * max(scale, 1e-30), f"{what}: max error {error:.3g} > {rel:g} x {scale:.3g}"


def _compare(inputs: dict[str, torch.Tensor], layout: str, grad_scale: float = -1.0, adv_logit_scale: float = 0.0,
             config: KernelConfig | None = None) -> None:
    """The kernel with `config` (default: `default_config` of `layout`) against the reference (module docstring)."""
    bf16 = inputs["embedding"].dtype == torch.bfloat16
    config = config or default_config(inputs["head_states"].shape[0], DEVICE, layout)
    expected, expected_grads = _run(mlm_and_sample, inputs, as_fp32=layout == "stacked_slots", grad_scale=grad_scale,
                                    impl="torch", adv_logit_scale=adv_logit_scale)
    actual, actual_grads = _run(mlm_and_sample_triton, inputs, as_fp32=False, grad_scale=grad_scale,
                                adv_logit_scale=adv_logit_scale, config=config)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.int64
    assert actual[2].dtype == inputs["embedding"].dtype
    _assert_close(actual[0], expected[0], 1e-5, "head_losses")
    assert torch.equal(actual[1], expected[1]), "sampled_ids differ"
    _assert_close(actual[2], expected[2], 1e-5, "sampled_embeds")
    for name, expected_grad in expected_grads.items():
        rel = 2e-2 if bf16 and name != "mix_logits" else 5e-4
        assert actual_grads[name].dtype == inputs[name].dtype, name
        _assert_close(actual_grads[name], expected_grad, rel, f"grad {name}")


@pytest.mark.parametrize("grad_scale, adv_logit_scale", [(-1.0, 0.0), (1.0, 0.0), (-1.0, 0.1), (1.0, 0.1)])
def test_matches_reference_fp32(layout: str, grad_scale: float, adv_logit_scale: float) -> None:
    # V = 150 is not a multiple of any tile; H = 80 is not a multiple of block_h.
    _compare(_inputs(3, 20, 80, 150, torch.float32), layout, grad_scale, adv_logit_scale)


def test_matches_reference_bf16(layout: str) -> None:
    _compare(_inputs(3, 24, 64, 200, torch.bfloat16), layout, adv_logit_scale=0.1)


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_other_head_counts(layout: str, num_heads: int) -> None:
    _compare(_inputs(num_heads, 12, 32, 100, torch.float32), layout)


def test_single_row(layout: str) -> None:
    _compare(_inputs(3, 1, 32, 130, torch.float32), layout)


def test_all_targets_one_token(layout: str) -> None:
    _compare(_inputs(3, 17, 32, 90, torch.float32, one_target=True), layout, adv_logit_scale=0.1)


def test_split_forward_and_several_chunks(layout: str) -> None:
    """Vocabulary splits (stacked_slots' forward) and several row chunks, not multiples of block_n in chunked_logits
    (12 rows of 4 x 150 fp32 logits fit the buffer), give the same results."""
    config = KernelConfig(layout=layout, block_n=16, block_v=32, block_h=32, num_splits=3,
                          buffer_bytes=3 * 16 * 150 * 4)
    _compare(_inputs(3, 40, 32, 150, torch.float32), layout, adv_logit_scale=0.1, config=config)


def test_kernel_and_dispatch_agree() -> None:
    inputs = _inputs(3, 8, 32, 70, torch.float32)
    args = (inputs["head_states"], inputs["mix_logits"], inputs["embedding"], inputs["bias"], inputs["targets"])
    from_kernel = mlm_and_sample_triton(*args, TAU, SEED)
    from_dispatch = mlm_and_sample(*args, TAU, SEED, impl="triton")
    for left, right in zip(from_kernel, from_dispatch):
        assert torch.equal(left, right)


def test_autocast_runs_the_kernel_in_the_autocast_dtype(layout: str) -> None:
    """Under bf16 autocast, fp32 leaves give what their bf16 copies give, and fp32 gradients of the same values."""
    inputs = _inputs(3, 10, 32, 90, torch.float32)
    names = ("head_states", "mix_logits", "embedding", "bias")
    config = default_config(3, DEVICE, layout)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        autocast_out, autocast_grads = _run(mlm_and_sample_triton, inputs, as_fp32=False, config=config)
    cast = {**inputs, **{name: inputs[name].to(torch.bfloat16) for name in names if name != "mix_logits"}}
    cast_out, cast_grads = _run(mlm_and_sample_triton, cast, as_fp32=False, config=config)
    assert autocast_out[2].dtype == torch.bfloat16
    for left, right in zip(autocast_out, cast_out):
        assert torch.equal(left, right)
    for name in names:
        assert autocast_grads[name].dtype == torch.float32, name
        assert torch.equal(autocast_grads[name], cast_grads[name].float()), name


def test_config_names_a_bad_layout_or_tile() -> None:
    with pytest.raises(ValueError, match=r"KernelConfig.layout: 'chunked' is not one of"):
        KernelConfig(layout="chunked")
    with pytest.raises(ValueError, match=r"KernelConfig.block_n: 8 is not a power of two >= 16 \(layout stacked_slots"):
        KernelConfig(layout="stacked_slots", block_n=8)
    assert KernelConfig(layout="chunked_logits", block_n=1).block_n == 1  # no tl.dot in its pass: any power of two
    with pytest.raises(ValueError, match=r"KernelConfig.block_v: 96 is not a power of two >= 1"):
        KernelConfig(layout="chunked_logits", block_v=96)


def test_empty_embedding_raises() -> None:
    inputs = _inputs(3, 4, 16, 32, torch.float32)
    empty = torch.empty(0, device=DEVICE)  # what a ZeRO-3-partitioned parameter looks like outside its module
    with pytest.raises(RuntimeError, match="GatheredParameters"):
        mlm_and_sample_triton(inputs["head_states"], inputs["mix_logits"], empty, inputs["bias"], inputs["targets"],
                              TAU, SEED)


@triton.jit
def _noise_kernel(out_ptr, seed, first_row, first_col, vocab, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_R)
    noise = gumbel(seed, rows, first_col, vocab, BLOCK_V)
    tl.store(out_ptr + tl.arange(0, BLOCK_R)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :], noise)


def test_noise_matches_gumbel_noise_beyond_32_bit_counters() -> None:
    """The kernels' noise is `gumbel_noise`'s stream, in any column tile, also where the counter needs its high word."""
    vocab, num_rows, seed = 70, 16, 2**40 + 3
    first_row = 2**34 // vocab + 5
    expected = gumbel_noise(seed, num_rows, vocab, row_offset=first_row, device=DEVICE)
    for first_col, block_v in ((0, 64), (32, 32), (64, 16)):
        out = torch.empty(num_rows, block_v, dtype=torch.float32, device=DEVICE)
        _noise_kernel[(1,)](out, seed, first_row, first_col, vocab, BLOCK_R=num_rows, BLOCK_V=block_v)
        valid = min(block_v, vocab - first_col)
        torch.testing.assert_close(out[:, :valid], expected[:, first_col:first_col + valid], rtol=1e-5, atol=1e-6)
