"""lightlm.onpolicy against torch.multinomial, CausalLM.generate, F.kl_div, lightlm.distill's top-k and full KL,
and hand computations of the generalized JSD in float64."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightlm import distill, onpolicy
from lightlm.transformer import CausalLM, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

VOCAB = 13


def _model(seed):
    torch.manual_seed(seed)
    return CausalLM(TransformerConfig(vocab_size=VOCAB, d_model=8, n_heads=2, n_layers=1, max_len=16))


def _prompts():
    return torch.randint(VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _by_hand(model, prompts, new_tokens, temperature, seed):
    """The sampling loop written out: full forward, last position, softmax(z / T), torch.multinomial."""
    generator, ids = torch.Generator().manual_seed(seed), prompts
    with torch.no_grad():
        for _ in range(new_tokens):
            probs = (model(ids)[:, -1] / temperature).softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


# --------------------------------------------------------------------------- sample


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_matches_torch_multinomial_and_causal_lm_generate(temperature):
    model, prompts = _model(0).eval(), _prompts()
    got = onpolicy.sample(model, prompts, 6, temperature, torch.Generator().manual_seed(1))
    assert torch.equal(got, _by_hand(model, prompts, 6, temperature, seed=1))
    reference = model.generate(prompts, 6, temperature=temperature, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, reference)
    other = onpolicy.sample(model, prompts, 6, temperature, torch.Generator().manual_seed(2))
    assert not torch.equal(got, other)  # the generator decides the draws


def test_sample_at_temperature_zero_is_greedy_and_restores_the_mode():
    model, prompts = _model(0).train(), _prompts()
    got = onpolicy.sample(model, prompts, 5, temperature=0.0)
    assert model.training  # restored
    assert torch.equal(got, model.generate(prompts, 5, temperature=0))
    assert torch.equal(got[:, :4], prompts) and got.shape == (3, 9)


def test_sample_reads_hugging_face_style_outputs():
    model, prompts = _model(0).eval(), _prompts()
    wrapped = lambda ids: SimpleNamespace(logits=model(ids))  # noqa: E731  (an HF model returns .logits)
    got = onpolicy.sample(wrapped, prompts, 4, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(got, _by_hand(model, prompts, 4, 1.0, seed=3))


# --------------------------------------------------------------------------- bucket_log_probs


def test_bucket_forward_kl_equals_distill_topk_kd_loss_bucket():
    z, v = _logits(2, 5, VOCAB, seed=0).float(), _logits(2, 5, VOCAB, seed=1).float()
    values, indices = distill.topk_teacher(v, 4)
    student = onpolicy.bucket_log_probs(F.log_softmax(z, -1).gather(-1, indices))
    teacher = onpolicy.bucket_log_probs(values)
    reference = distill.topk_kd_loss(z, values, indices, tail="bucket")  # its tail: logsumexp off K
    torch.testing.assert_close(onpolicy.token_divergence(student, teacher), reference, rtol=1e-5, atol=1e-6)


def test_bucket_tail_is_the_mass_off_k_summed_by_hand():
    log_p = F.log_softmax(_logits(3, VOCAB, seed=2), -1)
    keep = torch.tensor([0, 4, 7])
    bucketed = onpolicy.bucket_log_probs(log_p[:, keep])
    rest = torch.ones(VOCAB, dtype=torch.bool)
    rest[keep] = False
    expected = torch.cat([log_p[:, keep].exp(), log_p[:, rest].exp().sum(-1, keepdim=True)], dim=-1)
    torch.testing.assert_close(bucketed.exp(), expected)
    assert bucketed.dtype == torch.float64


def test_bucket_floor_keeps_rounded_values_finite():
    over_one = torch.log(torch.tensor([[0.6, 0.40001]]))  # rounding pushed the mass above 1
    bucketed = onpolicy.bucket_log_probs(over_one, floor=1e-6)
    assert torch.isfinite(bucketed).all()
    torch.testing.assert_close(bucketed.exp().sum(-1), torch.ones(1))
    tail_share = bucketed[0, -1].exp().item()
    assert 0.9e-6 < tail_share < 1.1e-6


# --------------------------------------------------------------------------- token_divergence


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_forward_and_reverse_equal_distill_kl_divergence_with_a_mask(direction):
    z, v = _logits(2, 6, VOCAB, seed=3), _logits(2, 6, VOCAB, seed=4)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    per_row = distill.kl_divergence(z, v, direction, reduction="none")  # (2, 6)
    expected = per_row[mask.bool()].mean()
    torch.testing.assert_close(onpolicy.token_divergence(z, v, direction, mask=mask), expected)
    torch.testing.assert_close(onpolicy.token_divergence(z, v, direction), per_row.mean())


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_generalized_jsd_equals_the_definition_by_hand(beta):
    z, v = _logits(4, VOCAB, seed=5), _logits(4, VOCAB, seed=6)
    p, q = v.softmax(-1), z.softmax(-1)
    m = beta * p + (1 - beta) * q
    expected = (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean()
    got = onpolicy.token_divergence(z, v, "jsd", beta=beta)
    torch.testing.assert_close(got, expected)
    assert 0 < got < -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # JSD_β ≤ H(β)


def test_jsd_half_is_symmetric_and_zero_only_for_equal_distributions():
    z, v = _logits(4, VOCAB, seed=7), _logits(4, VOCAB, seed=8)
    torch.testing.assert_close(onpolicy.token_divergence(z, v, "jsd"), onpolicy.token_divergence(v, z, "jsd"))
    torch.testing.assert_close(onpolicy.token_divergence(z, z + 3.0, "jsd"), torch.tensor(0.0, dtype=z.dtype))


# --------------------------------------------------------------------------- onpolicy_loss


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_onpolicy_loss_is_the_full_divergence_on_the_students_own_samples(divergence):
    student, teacher, prompts = _model(0), _model(1), _prompts()
    got = onpolicy.onpolicy_loss(student, teacher, prompts, 5, divergence, beta=0.3,
                                 generator=torch.Generator().manual_seed(9))
    ids = _by_hand(student.eval(), prompts, 5, 1.0, seed=9)
    with torch.no_grad():
        z, v = student(ids)[:, 3:8], teacher(ids)[:, 3:8]  # positions 3..7 predict sampled tokens 4..8
    if divergence == "jsd":
        p, q = v.softmax(-1), z.softmax(-1)
        m = 0.3 * p + 0.7 * q
        expected = (0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)).mean()
    else:
        expected = distill.kl_divergence(z, v, divergence)
    torch.testing.assert_close(got.detach(), expected)


def test_onpolicy_loss_with_top_k_equals_distill_topk_kd_loss_and_trains_only_the_student():
    student, teacher, prompts = _model(0), _model(1), _prompts()
    loss = onpolicy.onpolicy_loss(student, teacher, prompts, 5, k=4, generator=torch.Generator().manual_seed(9))
    ids = _by_hand(student.eval(), prompts, 5, 1.0, seed=9)
    with torch.no_grad():
        z, v = student(ids)[:, 3:8], teacher(ids)[:, 3:8]
    reference = distill.topk_kd_loss(z, *distill.topk_teacher(v, 4), tail="bucket")
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone.token_embedding.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_with_what_is_allowed():
    student, teacher, prompts = _model(0), _model(1), _prompts()
    z, v = _logits(2, VOCAB, seed=0), _logits(2, VOCAB, seed=1)
    with pytest.raises(TypeError, match="prompts must be an integer tensor"):
        onpolicy.sample(student, prompts.float(), 3)
    with pytest.raises(ValueError, match="prompts must be 2-D"):
        onpolicy.sample(student, prompts[0], 3)
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        onpolicy.sample(student, prompts, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        onpolicy.sample(student, prompts, 2, temperature=-1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        onpolicy.sample(student, prompts, 2, generator=0)
    with pytest.raises(ValueError, match=r"must map ids \(3, 4\) to logits"):
        onpolicy.sample(lambda ids: ids.float(), prompts, 2)
    with pytest.raises(ValueError, match="divergence must be one of 'forward', 'reverse', 'jsd'"):
        onpolicy.token_divergence(z, v, "symmetric")
    with pytest.raises(ValueError, match=r"beta .* must be in \(0, 1\)"):
        onpolicy.token_divergence(z, v, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="must have the same shape"):
        onpolicy.token_divergence(z, v[:, :5])
    with pytest.raises(ValueError, match="mask keeps no position"):
        onpolicy.token_divergence(z, v, mask=torch.zeros(2))
    with pytest.raises(ValueError, match="mask must have shape"):
        onpolicy.token_divergence(z, v, mask=torch.ones(3))
    with pytest.raises(TypeError, match="log_probs_k must be a floating-point tensor"):
        onpolicy.bucket_log_probs(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"floor .* must be in \(0, 1\)"):
        onpolicy.bucket_log_probs(z, floor=0.0)
    with pytest.raises(ValueError, match=r"k .* must be in \[1, 13\]"):
        onpolicy.onpolicy_loss(student, teacher, prompts, 2, k=VOCAB + 1)
    small_teacher = CausalLM(TransformerConfig(vocab_size=VOCAB + 2, d_model=8, n_heads=2, n_layers=1, max_len=16))
    with pytest.raises(ValueError, match="must share one vocabulary"):
        onpolicy.onpolicy_loss(student, small_teacher, prompts, 2)
