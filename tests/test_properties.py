"""Property-based tests (hypothesis): invariants of the KD losses, attention and BERT's masking, each checked
against torch or a closed form over random shapes, temperatures, masks and block sizes.

The examples are derandomized (the "lightlm" profile in tests/conftest.py), so CI sees the same cases on every
run; ``pytest tests/test_properties.py --hypothesis-profile=explore`` draws new ones. Tensors are drawn from a
seed (hypothesis shrinks the shape, the seed and the settings, not single elements).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightlm import distill, objectives
from lightlm.attention import scaled_dot_product_attention, tiled_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# As tests/test_attention.py: float64 to near machine precision, float32 to a few units in the last place.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**32 - 1)
TEMPERATURES = st.sampled_from([1.0, 2.0]) | st.floats(0.25, 8.0, allow_nan=False)
# normal: unit-scale logits; ties: small integers, so many equal logits; peaked: a nearly one-hot softmax whose
# smallest probabilities underflow to 0 in float32 at T < 1 (0 · log 0 must count as 0)
STYLES = st.sampled_from(["normal", "ties", "peaked"])


def _logits(shape, seed, style="normal", dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    if style == "ties":
        return torch.randint(-2, 3, shape, generator=generator).to(dtype)
    return torch.randn(shape, generator=generator, dtype=dtype) * (15.0 if style == "peaked" else 1.0)


@st.composite
def logit_shapes(draw, min_leading=0, max_classes=10):
    """(..., C): up to two leading (batch) dims and 1..max_classes classes."""
    leading = draw(st.lists(st.integers(1, 3), min_size=min_leading, max_size=2))
    return (*leading, draw(st.integers(1, max_classes)))


def _kd_reference(z, v, T):
    """T² · F.kl_div(log_softmax(z/T), softmax(v/T), "batchmean") over the rows of (..., C) logits."""
    z, v = z.reshape(-1, z.shape[-1]), v.reshape(-1, v.shape[-1])
    return T * T * F.kl_div(F.log_softmax(z / T, -1), F.softmax(v / T, -1), reduction="batchmean")


# --------------------------------------------------------------------------- the KD loss


@settings(max_examples=60)
@given(shape=logit_shapes(), T=TEMPERATURES, seed=SEEDS, style=STYLES, dtype=DTYPES)
def test_kd_loss_is_t_squared_kl_div_batchmean_for_any_shape_and_temperature(shape, T, seed, style, dtype):
    z, v = _logits(shape, seed, style, dtype), _logits(shape, seed + 1, style, dtype)
    torch.testing.assert_close(distill.kd_loss(z, v, T), _kd_reference(z, v, T))


@settings(max_examples=40)
@given(shape=logit_shapes(), T=TEMPERATURES, seed=SEEDS, style=STYLES,
       shifts=st.tuples(st.floats(-100, 100), st.floats(-100, 100)))
def test_kd_loss_is_nonnegative_zero_at_equal_logits_and_blind_to_a_per_row_constant(shape, T, seed, style, shifts):
    # float64: in float32 the shifted logits z + c themselves round, by up to |c|·2⁻²⁴, which is not a KL error
    z, v = _logits(shape, seed, style), _logits(shape, seed + 1, style)
    rows = shape[:-1] + (1,)
    c_z, c_v = (shift * (1 + _logits(rows, seed + 2)) for shift in shifts)  # a different constant per row
    loss = distill.kd_loss(z, v, T)
    assert loss >= -TOLERANCE[torch.float64]["atol"], loss  # KL ≥ 0 (Gibbs), up to rounding
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(distill.kd_loss(z, z, T), zero)
    torch.testing.assert_close(distill.kd_loss(z + c_z, z, T), zero, atol=1e-9, rtol=0)
    torch.testing.assert_close(distill.kd_loss(z + c_z, v + c_v, T), loss, rtol=1e-9, atol=1e-9)


@settings(max_examples=40)
@given(shape=logit_shapes(min_leading=1), T=TEMPERATURES, alpha=st.floats(0.0, 1.0), seed=SEEDS, style=STYLES,
       dtype=DTYPES)
def test_distillation_loss_is_alpha_kd_plus_one_minus_alpha_cross_entropy_over_labelled_rows(shape, T, alpha, seed,
                                                                                            style, dtype):
    z, v = _logits(shape, seed, style, dtype), _logits(shape, seed + 1, style, dtype)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(shape[-1], shape[:-1], generator=generator)
    labels[torch.rand(shape[:-1], generator=generator) < 0.3] = -100  # some rows carry no label ...
    labels.view(-1)[0] = 0  # ... but never all of them
    keep = labels != -100
    hard = F.cross_entropy(z[keep], labels[keep])
    expected = alpha * _kd_reference(z[keep], v[keep], T) + (1 - alpha) * hard
    loss = distill.distillation_loss(z, v, labels, T=T, alpha=alpha)
    torch.testing.assert_close(loss, expected)
    assert loss >= -TOLERANCE[dtype]["atol"]
    # equal logits: only the hard term is left
    torch.testing.assert_close(distill.distillation_loss(z, z, labels, T=T, alpha=alpha), (1 - alpha) * hard)


@settings(max_examples=50)
@given(shape=logit_shapes(), T=TEMPERATURES, seed=SEEDS, style=STYLES, dtype=DTYPES)
def test_kd_gradient_is_t_over_n_times_q_minus_p_so_never_above_t_over_n(shape, T, seed, style, dtype):
    z, v = _logits(shape, seed, style, dtype), _logits(shape, seed + 1, style, dtype)
    z.requires_grad_()
    (gradient,) = torch.autograd.grad(distill.kd_loss(z, v, T), z)
    rows = z.numel() // shape[-1]  # N: every leading dim is a batch dim
    q, p = F.softmax(z.detach() / T, -1), F.softmax(v / T, -1)
    closed_form = T * (q - p) / rows  # ∂(T² KL)/∂z = T (q − p) / N
    torch.testing.assert_close(gradient, closed_form)
    # |q_i − p_i| ≤ 1, so |∂L/∂z_i| ≤ T/N for every T: the T² factor keeps the gradient's scale; the margin
    # allows the few roundings of T², 1/N and 1/T in autograd's chain
    bound = T / rows * (1 + 8 * torch.finfo(dtype).eps)
    assert gradient.abs().max() <= bound, (gradient.abs().max(), T / rows)


# --------------------------------------------------------------------------- top-k KD


@settings(max_examples=40)
@given(shape=logit_shapes(min_leading=1, max_classes=12), T=TEMPERATURES, seed=SEEDS, style=STYLES)
def test_topk_bucket_lies_between_zero_and_full_kl_for_every_k_and_both_tails_equal_kd_loss_at_k_equal_v(
        shape, T, seed, style):
    z, v = _logits(shape, seed, style), _logits(shape, seed + 1, style)
    vocab = shape[-1]
    full = distill.kd_loss(z, v, T)
    log_q = F.log_softmax(z / T, -1)
    for k in range(1, vocab + 1):
        values, indices = distill.topk_teacher(v, k, T)
        bucket = distill.topk_kd_loss(z, values, indices, T=T, tail="bucket")
        # merging outcomes never raises a KL (data processing inequality); equal at k = V − 1 and V
        assert -1e-15 <= bucket <= full * (1 + 1e-12) + 1e-15, (k, bucket, full)
        # renormalised: Σ_K p̃ log(p̃/q) = KL(p̃ ‖ q/Q_K) − log Q_K with Q_K = Σ_K q, each term ≥ 0
        renormalised = distill.topk_kd_loss(z, values, indices, T=T, tail="renormalise")
        log_q_k = log_q.gather(-1, indices)
        log_mass = log_q_k.logsumexp(-1, keepdim=True)  # log Q_K
        p_tilde = values.softmax(-1)  # the teacher renormalised over K
        kl = F.kl_div(log_q_k - log_mass, p_tilde, reduction="none").sum(-1) - log_mass.squeeze(-1)
        torch.testing.assert_close(renormalised, T * T * kl.mean())
        assert renormalised >= -1e-15
    for tail in ("bucket", "renormalise"):  # k = V: every token is cached, nothing is approximated
        torch.testing.assert_close(distill.topk_kd_loss(z, *distill.topk_teacher(v, vocab, T), T=T, tail=tail), full)


# --------------------------------------------------------------------------- attention


@st.composite
def attention_cases(draw, max_len=9, dtypes=DTYPES):
    """q (B, H, L, d_k), k (B, H, S, d_k), v (B, H, S, d_v) and one of: no mask, a random boolean mask (often
    with fully masked rows), a float mask with -inf entries, is_causal; masks in a random broadcastable shape."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_queries, n_keys = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d_k, d_v = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dtype, seed = draw(dtypes), draw(SEEDS)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=generator, dtype=dtype)
               for n, d in ((n_queries, d_k), (n_keys, d_k), (n_keys, d_v)))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    if kind in ("none", "causal"):
        return q, k, v, None, kind == "causal"
    full = (batch, heads, n_queries, n_keys)
    shape = tuple(draw(st.sampled_from([1, n])) for n in full)[draw(st.integers(0, 2)):]  # 2 to 4 dims
    keep = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.2, 0.5, 0.9, 1.0]))
    if kind == "bool":
        return q, k, v, keep, False
    mask = (2 * torch.randn(shape, generator=generator, dtype=dtype)).masked_fill(~keep, float("-inf"))
    return q, k, v, mask, False


def _torch_sdpa(q, k, v, mask, is_causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _fully_masked_rows(mask, shape):
    """(..., L) True where a query may attend to no key, from the mask itself."""
    if mask is None:
        return torch.zeros(shape[:-1], dtype=torch.bool)
    blocked = ~mask if mask.dtype == torch.bool else mask == float("-inf")
    return blocked.expand(shape).all(-1)


@settings(max_examples=60)
@given(case=attention_cases())
def test_attention_rows_sum_to_one_unless_fully_masked_and_output_equals_torch(case):
    q, k, v, mask, is_causal = case
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores_shape = (*q.shape[:-1], k.shape[-2])
    empty = _fully_masked_rows(mask, scores_shape)  # causal: key 0 is always visible, so never empty
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), (~empty).to(weights.dtype), **TOLERANCE[q.dtype])
    if mask is not None:
        blocked = ~mask if mask.dtype == torch.bool else mask == float("-inf")
        assert (weights[blocked.expand(scores_shape)] == 0).all()
    torch.testing.assert_close(out, _torch_sdpa(q, k, v, mask, is_causal), **TOLERANCE[q.dtype])


@settings(max_examples=80)
@given(case=attention_cases(max_len=20), data=st.data())
def test_tiled_attention_equals_torch_sdpa_for_any_block_size_and_mask(case, data):
    q, k, v, mask, is_causal = case
    block_size = data.draw(st.integers(1, q.shape[-2] + 3), label="block_size")
    expected = _torch_sdpa(q, k, v, mask, is_causal)  # fully masked rows: 0, as torch's safe softmax
    actual = tiled_attention(q, k, v, block_size=block_size, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(actual, expected, **TOLERANCE[q.dtype])


# --------------------------------------------------------------------------- BERT's masking


@settings(max_examples=40)
@given(batch=st.integers(1, 4), seq=st.integers(1, 30), vocab=st.integers(5, 50),
       probability=st.sampled_from([0.05, 0.15, 0.5, 0.95]), seed=SEEDS)
def test_mlm_mask_never_touches_special_or_padding_and_labels_are_the_originals_where_chosen(batch, seq, vocab,
                                                                                            probability, seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (batch, seq), generator=generator)
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(seq) < lengths[:, None]).long()  # padding at the end of each row
    special = torch.rand(batch, seq, generator=generator) < 0.2  # [CLS], [SEP], ... anywhere
    original = input_ids.clone()
    masked, labels = objectives.mlm_mask(input_ids, vocab - 1, vocab, mlm_probability=probability,
                                         special_tokens_mask=special.long(), attention_mask=attention_mask,
                                         generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(input_ids, original)  # the caller's ids are not modified
    untouchable = special | (attention_mask == 0)
    chosen = labels != -100
    assert not (chosen & untouchable).any()
    assert torch.equal(masked[untouchable], original[untouchable])
    assert torch.equal(labels[chosen], original[chosen])  # the original id where chosen, -100 elsewhere
    assert (labels[~chosen] == -100).all()
    assert not ((masked != original) & ~chosen).any()  # only chosen positions may change
    assert ((masked >= 0) & (masked < vocab)).all()
