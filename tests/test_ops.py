"""The vocabulary-path contract (amos_ds.ops): noise stream, sampling law, gradients, plain vs chunked."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from amos_ds import ops
from amos_ds.ops.gumbel import philox_uniform
from amos_ds.ops.vocab_path import mlm_and_sample_chunked, mlm_and_sample_torch


def random_inputs(num_heads=3, num_rows=37, hidden=16, vocab=101, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    head_states = torch.randn(num_heads, num_rows, hidden, generator=generator, dtype=dtype)
    mix_logits = torch.randn(num_rows, num_heads, generator=generator)
    embedding = torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5
    bias = torch.randn(vocab, generator=generator, dtype=dtype) * 0.1
    targets = torch.randint(0, vocab, (num_rows,), generator=generator)
    grad_sampled = torch.randn(num_rows, hidden, generator=generator, dtype=dtype)
    return (head_states, mix_logits, embedding, bias), targets, grad_sampled


def run(function, tensors, targets, grad_sampled, **kwargs):
    """Forward, then backward of sum_k (k+1) * loss_k + <sampled_embeds, grad_sampled>; returns outputs and grads."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    losses, ids, embeds = function(*leaves, targets, 0.3, 1234, **kwargs)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype)
    ((losses * weights).sum() + (embeds * grad_sampled).sum()).backward()
    return losses.detach(), ids, embeds.detach(), [leaf.grad for leaf in leaves]


def test_philox_uniform_matches_triton_rand_stream():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def uniform_kernel(out_ptr, seed, vocab_size, row_offset, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        offsets = (row + row_offset).to(tl.int64) * vocab_size + cols
        tl.store(out_ptr + row * vocab_size + cols, tl.rand(seed, offsets), mask=cols < vocab_size)

    # A row offset large enough that the counter crosses 2**32, the seed wider than 32 bits.
    seed, rows, vocab, row_offset = 2**40 + 17, 3, 50, 2**32 // 50 - 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = torch.empty(rows, vocab, device=device)
    uniform_kernel[(rows,)](expected, seed, vocab, row_offset, BLOCK=64)
    offsets = torch.arange(row_offset, row_offset + rows)[:, None] * vocab + torch.arange(vocab)[None, :]
    assert torch.equal(philox_uniform(seed, offsets), expected.cpu())


def test_gumbel_noise_matches_triton_randint4x_stream():
    """Id v of row r: word v % 4 of tl.randint4x(seed, r * ceil(V / 4) + v // 4), as a uniform float."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def uniform_kernel(out_ptr, seed, quads, row_offset, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        q = tl.arange(0, BLOCK)
        word0, word1, word2, word3 = tl.randint4x(seed, (row + row_offset).to(tl.int64) * quads + q)
        out = out_ptr + row * 4 * quads + 4 * q
        tl.store(out, tl.uint_to_uniform_float(word0), mask=q < quads)
        tl.store(out + 1, tl.uint_to_uniform_float(word1), mask=q < quads)
        tl.store(out + 2, tl.uint_to_uniform_float(word2), mask=q < quads)
        tl.store(out + 3, tl.uint_to_uniform_float(word3), mask=q < quads)

    # A row offset large enough that the counter crosses 2**32, the seed wider than 32 bits, V not a multiple of 4.
    seed, rows, vocab = 2**40 + 17, 3, 50
    quads = -(-vocab // 4)
    row_offset = 2**32 // quads - 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    uniform = torch.empty(rows, 4 * quads, device=device)
    uniform_kernel[(rows,)](uniform, seed, quads, row_offset, BLOCK=16)
    expected = -torch.log(-torch.log(uniform.cpu()[:, :vocab]))
    torch.testing.assert_close(ops.gumbel_noise(seed, rows, vocab, row_offset=row_offset), expected, rtol=0, atol=0)


def test_gumbel_noise_is_a_function_of_seed_row_and_vocab_id():
    full = ops.gumbel_noise(7, 10, 33)
    assert torch.equal(ops.gumbel_noise(7, 4, 33, row_offset=6), full[6:])
    assert not torch.equal(ops.gumbel_noise(8, 10, 33), full)
    # Gumbel(0, 1): mean is the Euler-Mascheroni constant, variance pi^2 / 6.
    sample = ops.gumbel_noise(3, 400, 500)
    assert abs(sample.mean().item() - 0.5772) < 0.01
    assert abs(sample.var().item() - math.pi**2 / 6) < 0.03


def test_samples_follow_the_mixed_softmax():
    """Chi-squared goodness of fit of 30,000 Gumbel-max draws against softmax(sum_k gamma_k logits_k)."""
    num_rows, hidden, vocab = 30000, 4, 6
    generator = torch.Generator().manual_seed(5)
    embedding = torch.randn(vocab, hidden, generator=generator)
    bias = torch.randn(vocab, generator=generator)
    states = torch.randn(2, 1, hidden, generator=generator).expand(2, num_rows, hidden).contiguous()
    mix_logits = torch.tensor([[0.3, -0.4]]).expand(num_rows, 2).contiguous()
    targets = torch.zeros(num_rows, dtype=torch.long)
    _, ids, _ = ops.mlm_and_sample(states, mix_logits, embedding, bias, targets, tau=0.3, seed=99, impl="chunked")
    logits = states[:, 0] @ embedding.t() + bias
    mixed = (torch.softmax(mix_logits[0], -1)[:, None] * logits).sum(0)
    observed = torch.bincount(ids, minlength=vocab).double()

    def chi_squared(probabilities):
        expected = probabilities.double() * num_rows
        return ((observed - expected) ** 2 / expected).sum().item()

    # 5 degrees of freedom: P(chi2 > 25.7) = 1e-4. The wrong law (softmax at temperature tau) must be rejected.
    assert chi_squared(torch.softmax(mixed, -1)) < 25.7
    assert chi_squared(torch.softmax(mixed / 0.3, -1)) > 100


@pytest.mark.parametrize("adv_logit_scale", [0.0, 0.1])
@pytest.mark.parametrize("grad_scale", [-1.0, 1.0, -0.5])
def test_chunked_equals_plain(adv_logit_scale, grad_scale):
    tensors, targets, grad_sampled = random_inputs()
    kwargs = dict(grad_scale=grad_scale, adv_logit_scale=adv_logit_scale)
    plain = run(mlm_and_sample_torch, tensors, targets, grad_sampled, **kwargs)
    chunked = run(mlm_and_sample_chunked, tensors, targets, grad_sampled, chunk_rows=8, **kwargs)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(chunked[1], plain[1])
    assert torch.equal(chunked[2], plain[2])
    for name, got, want in zip(("head_states", "mix_logits", "embedding", "bias"), chunked[3], plain[3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_chunked_equals_plain_in_bf16_and_when_only_the_losses_are_trained():
    tensors, targets, grad_sampled = random_inputs(dtype=torch.bfloat16)
    plain = run(mlm_and_sample_torch, tensors, targets, grad_sampled)
    chunked = run(mlm_and_sample_chunked, tensors, targets, grad_sampled, chunk_rows=8)
    assert torch.equal(chunked[1], plain[1])
    for name, got, want in zip(("head_states", "mix_logits", "embedding", "bias"), chunked[3], plain[3]):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item(), msg=name)

    tensors, targets, _ = random_inputs()
    grads = []
    for function in (mlm_and_sample_torch, mlm_and_sample_chunked):
        leaves = [t.clone().requires_grad_() for t in tensors]
        losses, _, _ = function(*leaves, targets, 0.3, 1234)
        losses.sum().backward()  # the samples take no part: no gradient reaches the mixture
        grads.append([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_plain_matches_hand_written_formulas():
    """Losses, sample and every gradient of the reference against the contract's formulas, term by term."""
    (states, mix_logits, embedding, bias), targets, grad_sampled = random_inputs(num_heads=2, num_rows=5, vocab=13)
    losses, ids, embeds, grads = run(mlm_and_sample_torch, (states, mix_logits, embedding, bias), targets,
                                     grad_sampled, grad_scale=-1.0)
    logits = states @ embedding.t() + bias
    for k in range(2):
        torch.testing.assert_close(losses[k], F.cross_entropy(logits[k], targets))
    gamma = torch.softmax(mix_logits, -1)
    mixed = torch.einsum("nk,knv->nv", gamma, logits)
    noise = ops.gumbel_noise(1234, 5, 13)
    assert torch.equal(ids, (mixed + noise).argmax(-1))
    assert torch.equal(embeds, embedding[ids])

    weights = torch.tensor([1.0, 2.0]).view(2, 1, 1)
    grad_logits = (torch.softmax(logits, -1) - F.one_hot(targets, 13)) / 5 * weights
    y = torch.softmax((mixed + noise) / 0.3, -1)
    grad_y = grad_sampled @ embedding.t()
    grad_mixed = -(y * (grad_y - (y * grad_y).sum(-1, keepdim=True)) / 0.3)
    grad_gamma = torch.einsum("nv,knv->nk", grad_mixed, logits)
    grad_mix = gamma * (grad_gamma - (gamma * grad_gamma).sum(-1, keepdim=True))
    grad_embedding = torch.einsum("knv,knh->vh", grad_logits, states).index_add(0, ids, grad_sampled)
    torch.testing.assert_close(grads[0], grad_logits @ embedding)
    torch.testing.assert_close(grads[1], grad_mix)
    torch.testing.assert_close(grads[2], grad_embedding)
    torch.testing.assert_close(grads[3], grad_logits.sum((0, 1)))


@pytest.mark.parametrize("function", [mlm_and_sample_torch, mlm_and_sample_chunked])
def test_gradient_reversal_flips_only_the_mixture_gradient(function):
    tensors, targets, grad_sampled = random_inputs()
    zero_losses = torch.zeros(3)
    grads = {}
    for scale in (-1.0, 1.0):
        leaves = [t.clone().requires_grad_() for t in tensors]
        losses, _, embeds = function(*leaves, targets, 0.3, 1234, grad_scale=scale)
        ((losses * zero_losses).sum() + (embeds * grad_sampled).sum()).backward()
        grads[scale] = [leaf.grad for leaf in leaves]
    # mix_logits: reversed, with entries far above the tolerance, so that the sign is what is checked.
    assert grads[1.0][1].abs().max() > 0.1
    torch.testing.assert_close(grads[-1.0][1], -grads[1.0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[-1.0][2], grads[1.0][2])  # embedding: the lookup, unchanged
    assert torch.count_nonzero(grads[-1.0][0]) == 0  # per-head logits detached: no gradient to head_states
    assert torch.count_nonzero(grads[-1.0][3]) == 0


def test_adversarial_logit_gradient_is_scaled():
    tensors, targets, grad_sampled = random_inputs()
    zero_losses = torch.zeros(3)
    state_grads = []
    for scale in (0.1, 0.2):
        leaves = [t.clone().requires_grad_() for t in tensors]
        losses, _, embeds = mlm_and_sample_torch(*leaves, targets, 0.3, 1234, adv_logit_scale=scale)
        ((losses * zero_losses).sum() + (embeds * grad_sampled).sum()).backward()
        state_grads.append(leaves[0].grad)
    assert state_grads[0].abs().sum() > 0
    torch.testing.assert_close(state_grads[1], 2 * state_grads[0])


def test_dispatch_and_shape_errors():
    tensors, targets, grad_sampled = random_inputs(num_rows=4)
    assert ops.resolve_impl("auto", torch.device("cpu"), ops.AUTO_TORCH_MAX_LOGITS) == "torch"
    assert ops.resolve_impl("auto", torch.device("cpu"), ops.AUTO_TORCH_MAX_LOGITS + 1) == "chunked"
    # The defaults: the paper's reversed gradient (-1), no +adv MLM scale, and the implementation chosen by size.
    defaults = run(ops.mlm_and_sample, tensors, targets, grad_sampled)
    explicit = run(mlm_and_sample_torch, tensors, targets, grad_sampled, grad_scale=-1.0, adv_logit_scale=0.0)
    torch.testing.assert_close(defaults, explicit, rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.mlm_and_sample(*tensors, targets, 0.3, 0, impl="fast")
    states, mix_logits, embedding, bias = tensors
    for wrong in ([states, mix_logits[:, :2], embedding, bias, targets], [states, mix_logits, embedding[:, :8], bias,
                  targets], [states, mix_logits, embedding, bias[:100], targets], [*tensors, targets[:3]]):
        with pytest.raises(ValueError, match="inconsistent shapes"):
            ops.mlm_and_sample(*wrong, 0.3, 0)
    with pytest.raises(RuntimeError) as raised:
        ops.mlm_and_sample(states, mix_logits, torch.empty(0), torch.empty(0), targets, 0.3, 0)
    assert str(raised.value) == ("mlm_and_sample: the embedding is empty, as a ZeRO-3 partitioned parameter is outside "
                                 "its owner's forward; gather it (call from the owning module, or GatheredParameters)")


def test_auto_chooses_by_the_number_of_logits(monkeypatch):
    """K x N x V logits at most AUTO_TORCH_MAX_LOGITS: the plain path; one more: the chunked one."""
    tensors, targets, _ = random_inputs(num_rows=4)  # 3 heads x 4 rows x 101 ids = 1,212 logits
    ran = []

    def spy(name):
        function = getattr(ops, name)

        def recorded(*args):
            ran.append(name)
            return function(*args)
        return recorded

    for name in ("mlm_and_sample_torch", "mlm_and_sample_chunked"):
        monkeypatch.setattr(ops, name, spy(name))
    for threshold, expected in ((1212, "mlm_and_sample_torch"), (1211, "mlm_and_sample_chunked")):
        monkeypatch.setattr(ops, "AUTO_TORCH_MAX_LOGITS", threshold)
        ops.mlm_and_sample(*tensors, targets, 0.3, 0)
        assert ran.pop() == expected and not ran


def test_triton_without_the_kernel_package_is_a_clear_error(monkeypatch):
    tensors, targets, _ = random_inputs(num_rows=4)
    monkeypatch.setitem(sys.modules, "amos_kernels", None)  # what Python does when the package is not installed
    with pytest.raises(RuntimeError, match=r"impl='triton' needs the amos_kernels package and Triton: "):
        ops.mlm_and_sample(*tensors, targets, 0.3, 0, impl="triton")
    assert not ops.triton_available()


def test_auto_takes_the_kernel_exactly_for_cuda_tensors_where_it_imports(monkeypatch):
    """CUDA as the machine reports it (faked on a CPU-only one): "auto" picks the kernel for CUDA tensors, never for
    CPU tensors, and falls back by size when the kernel package does not import."""
    cuda, cpu, logits = torch.device("cuda"), torch.device("cpu"), ops.AUTO_TORCH_MAX_LOGITS + 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ops.triton_available()  # amos_kernels is installed with the project
    assert ops.resolve_impl("auto", cuda, 0) == "triton" and ops.resolve_impl("auto", cuda, logits) == "triton"
    assert ops.resolve_impl("auto", cpu, 0) == "torch" and ops.resolve_impl("auto", cpu, logits) == "chunked"
    monkeypatch.setitem(sys.modules, "amos_kernels", None)
    assert not ops.triton_available()
    assert ops.resolve_impl("auto", cuda, 0) == "torch" and ops.resolve_impl("auto", cuda, logits) == "chunked"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "amos_kernels")
    assert not ops.triton_available()  # the kernel imports, but there is no GPU to run it
