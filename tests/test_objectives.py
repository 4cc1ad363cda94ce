"""lightlm.objectives: BERT's masking rates, and the causal-LM loss against SmolLM2 and F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightlm import objectives

VOCAB = 1000
PAD, CLS, SEP, MASK = 0, 1, 2, 3  # special ids; ordinary tokens are drawn from [5, VOCAB)
SIGMAS = 5  # a rate check fails by chance with probability < 1e-6


@pytest.fixture(scope="module")
def batch():
    """(batch, seq) = (250, 1000) ids: [CLS] ... [SEP] then padding of random length; about 200k eligible tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (250, 1000), generator=generator)
    lengths = torch.randint(700, 1001, (250,), generator=generator)  # real tokens per row, [CLS] and [SEP] included
    positions = torch.arange(1000)
    attention_mask = (positions < lengths[:, None]).long()
    input_ids[attention_mask == 0] = PAD
    input_ids[:, 0] = CLS
    input_ids[torch.arange(250), lengths - 1] = SEP
    special_tokens_mask = ((input_ids == CLS) | (input_ids == SEP) | (input_ids == PAD)).long()
    return input_ids, attention_mask, special_tokens_mask


@pytest.fixture(scope="module")
def masked(batch):
    input_ids, attention_mask, special_tokens_mask = batch
    original = input_ids.clone()
    result = objectives.mlm_mask(input_ids, MASK, VOCAB, special_tokens_mask=special_tokens_mask,
                                 attention_mask=attention_mask, generator=torch.Generator().manual_seed(1))
    return original, result


def _assert_binomial(count, n, p):
    """|count − np| ≤ 5σ with σ = √(n p (1 − p)), the spread of a Binomial(n, p) count."""
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= SIGMAS * sigma, f"count {count}, expected {n * p:.0f} ± {SIGMAS * sigma:.0f}"


def test_selection_rate_is_fifteen_percent_of_eligible_tokens(batch, masked):
    input_ids, attention_mask, special_tokens_mask = batch
    _, (_, labels) = masked
    eligible = (attention_mask == 1) & (special_tokens_mask == 0)
    n = int(eligible.sum())
    assert n > 200_000
    _assert_binomial(int((labels != -100).sum()), n, 0.15)


def test_chosen_tokens_split_80_10_10(masked):
    original, (masked_ids, labels) = masked
    chosen = labels != -100
    k = int(chosen.sum())
    shown = masked_ids[chosen]
    # a random replacement lands on [MASK] or on the original token with probability 1/V each
    _assert_binomial(int((shown == MASK).sum()), k, 0.8 + 0.1 / VOCAB)
    _assert_binomial(int((shown == original[chosen]).sum()), k, 0.1 + 0.1 / VOCAB)
    _assert_binomial(int(((shown != MASK) & (shown != original[chosen])).sum()), k, 0.1 * (1 - 2 / VOCAB))


def test_random_replacements_are_ids_of_the_vocabulary(masked):
    original, (masked_ids, labels) = masked
    replaced = (labels != -100) & (masked_ids != MASK) & (masked_ids != original)
    values = masked_ids[replaced]
    assert values.min() >= 0 and values.max() < VOCAB
    assert values.unique().numel() > 900  # ~3,000 uniform draws cover ~95 % of 1,000 ids


def test_special_tokens_and_padding_are_never_selected(batch, masked):
    input_ids, attention_mask, special_tokens_mask = batch
    _, (masked_ids, labels) = masked
    excluded = (attention_mask == 0) | (special_tokens_mask == 1)
    assert torch.all(labels[excluded] == -100)
    assert torch.equal(masked_ids[excluded], input_ids[excluded])


def test_labels_hold_the_original_id_exactly_where_selected(masked):
    original, (masked_ids, labels) = masked
    chosen = labels != -100
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(masked_ids[~chosen], original[~chosen])  # unselected tokens are never altered


def test_input_tensor_is_not_modified(batch, masked):
    original, _ = masked
    assert torch.equal(batch[0], original)


def test_same_generator_seed_gives_the_same_masking():
    input_ids = torch.randint(5, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    first = objectives.mlm_mask(input_ids, MASK, VOCAB, generator=torch.Generator().manual_seed(7))
    again = objectives.mlm_mask(input_ids, MASK, VOCAB, generator=torch.Generator().manual_seed(7))
    other = objectives.mlm_mask(input_ids, MASK, VOCAB, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_shift_pairs_each_position_with_the_next_token_and_ignores_padding():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    inputs, targets = objectives.shift_for_causal_lm(input_ids, attention_mask)
    assert torch.equal(inputs, torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert torch.equal(targets, torch.tensor([[6, 7, -100], [9, 10, 11]]))


def test_causal_lm_loss_equals_cross_entropy_on_manually_shifted_tensors():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)  # (batch, seq, vocab)
    input_ids = torch.randint(0, 7, (2, 5), generator=generator)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    targets = input_ids[:, 1:].clone()
    targets[attention_mask[:, 1:] == 0] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), targets.reshape(-1))  # mean over 4 + 2 targets
    torch.testing.assert_close(objectives.causal_lm_loss(logits, input_ids, attention_mask), expected)
    unpadded = F.cross_entropy(logits[:, :-1].reshape(-1, 7), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(objectives.causal_lm_loss(logits, input_ids), unpadded)


def test_causal_lm_loss_equals_smollm2_loss_on_a_padded_batch(smollm2):
    tokenizer, model = smollm2
    sentences = ["Knowledge distillation trains a small student to imitate a large teacher.",
                 "LoRA freezes the weights."]
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any()  # the batch really is padded
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    with torch.no_grad():
        output = model(**encoded, labels=labels)
    ours = objectives.causal_lm_loss(output.logits, encoded["input_ids"], encoded["attention_mask"])
    torch.testing.assert_close(ours, output.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(objectives.causal_lm_loss(output.logits, labels), output.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, mlm_probability=0.0), ValueError, "mlm_probability"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, mlm_probability=1.0), ValueError, "mlm_probability"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, mlm_probability=1.5), ValueError, "mlm_probability"),
        (lambda ids: objectives.mlm_mask(ids, VOCAB, VOCAB), ValueError, "mask_token_id"),
        (lambda ids: objectives.mlm_mask(ids, -1, VOCAB), ValueError, "mask_token_id"),
        (lambda ids: objectives.mlm_mask(ids, MASK, 0), ValueError, "vocab_size"),
        (lambda ids: objectives.mlm_mask(ids.float(), MASK, VOCAB), TypeError,
         "input_ids must be an integer tensor, got dtype torch.float32"),
        (lambda ids: objectives.mlm_mask(ids.tolist(), MASK, VOCAB), TypeError, "input_ids must be a torch.Tensor"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, mlm_probability="0.15"), TypeError,
         "mlm_probability must be a real number, got str"),
        (lambda ids: objectives.mlm_mask(ids, float(MASK), VOCAB), TypeError, "mask_token_id must be an int"),
        (lambda ids: objectives.mlm_mask(ids, MASK, True), TypeError, "vocab_size must be an int, got bool"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, special_tokens_mask=[0] * 5), TypeError,
         "special_tokens_mask must be a torch.Tensor or None"),
        (lambda ids: objectives.shift_for_causal_lm(ids, ignore_index=-100.0), TypeError,
         "ignore_index must be an int, got float"),
        (lambda ids: objectives.causal_lm_loss(torch.randn(2, 5, 11).long(), ids), TypeError,
         "logits must be a floating-point tensor"),
        (lambda ids: objectives.causal_lm_loss(torch.randn(2, 5, 11), ids.float()), TypeError,
         "input_ids must be an integer tensor"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, attention_mask=torch.ones(2, 3)), ValueError,
         "attention_mask"),
        (lambda ids: objectives.mlm_mask(ids, MASK, VOCAB, generator=7), TypeError, "generator"),
        (lambda ids: objectives.causal_lm_loss(torch.randn(2, 6, 11), ids), ValueError, "same batch and seq"),
        (lambda ids: objectives.causal_lm_loss(torch.randn(2, 5), ids), ValueError, "batch, seq, vocab"),
        (lambda ids: objectives.causal_lm_loss(torch.randn(2, 5, 11), ids, torch.zeros(2, 5)), ValueError,
         "every target"),
        (lambda ids: objectives.shift_for_causal_lm(ids[:, :1]), ValueError, "at least 2 tokens"),
        (lambda ids: objectives.shift_for_causal_lm(ids[0]), ValueError, "batch, seq"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    input_ids = torch.randint(5, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=message):
        call(input_ids)
