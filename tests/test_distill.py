"""lightlm.distill against F.kl_div / F.cross_entropy, the closed-form gradients of chapter 6, hand computations,
and one step of a real transformers.Trainer."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lightlm import distill

BATCH, CLASSES = 4, 5


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _logits(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _student_teacher(seed=0):
    """(BATCH, CLASSES) student logits z and teacher logits v, float64 for tight comparisons."""
    return _logits(BATCH, CLASSES, seed=seed), _logits(BATCH, CLASSES, seed=seed + 100)


def _kd_gradient(z, v, T, scale=1.0):
    """∂(scale · kd_loss(z, v, T)) / ∂z by autograd."""
    z = z.clone().requires_grad_()
    (scale * distill.kd_loss(z, v, T)).backward()
    return z.grad


# --------------------------------------------------------------------------- chapter 6: the KD loss


def test_softmax_t_is_softmax_of_logits_divided_by_t():
    z, _ = _student_teacher()
    torch.testing.assert_close(distill.softmax_t(z, 3.0), F.softmax(z / 3.0, dim=-1))


@pytest.mark.parametrize("T", [1.0, 2.0, 7.5])
def test_kd_loss_equals_t_squared_kl_div_batchmean(T):
    z, v = _student_teacher()
    expected = T * T * F.kl_div(F.log_softmax(z / T, -1), F.softmax(v / T, -1), reduction="batchmean")
    torch.testing.assert_close(distill.kd_loss(z, v, T), expected)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # torch's own warning about it
def test_kl_div_reduction_mean_is_smaller_by_exactly_the_number_of_classes():
    z, v = _student_teacher()
    log_q, p = F.log_softmax(z, -1), F.softmax(v, -1)
    batchmean = F.kl_div(log_q, p, reduction="batchmean")  # Σ / batch: the KL per example
    mean = F.kl_div(log_q, p, reduction="mean")  # Σ / (batch · classes): not a KL of anything
    torch.testing.assert_close(batchmean / mean, torch.tensor(float(CLASSES), dtype=torch.float64))
    torch.testing.assert_close(distill.kd_loss(z, v, T=1.0), batchmean)


def test_kd_loss_flattens_leading_dims_into_the_batch():
    z, v = _logits(2, 3, CLASSES), _logits(2, 3, CLASSES, seed=1)  # (batch, seq, vocab)
    torch.testing.assert_close(distill.kd_loss(z, v, 2.0), distill.kd_loss(z.reshape(6, -1), v.reshape(6, -1), 2.0))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_gradient_matches_closed_form_t_times_q_minus_p_over_n(T):
    z, v = _student_teacher()
    closed_form = T * (F.softmax(z / T, -1) - F.softmax(v / T, -1)) / BATCH  # ∂(T² KL)/∂z = T (q − p) / N
    torch.testing.assert_close(_kd_gradient(z, v, T), closed_form)


def test_t_squared_keeps_gradient_size_while_unscaled_gradient_shrinks_like_one_over_t_squared():
    # For large T, T(q − p) = (z − v)/C + O(|logits|/T) relative: with unit-scale logits the scaled gradient
    # is within ~10 % of its limit at T = 10, and closer at T = 100, so the two norms agree within 10 %.
    z, v = _student_teacher()
    scaled = {T: _kd_gradient(z, v, T).norm() for T in (10.0, 100.0)}
    unscaled = {T: _kd_gradient(z, v, T, scale=1 / T**2).norm() for T in (10.0, 100.0)}
    assert 0.9 < scaled[100.0] / scaled[10.0] < 1.1
    assert 0.9 < (unscaled[100.0] / unscaled[10.0]) * (100 / 10) ** 2 < 1.1  # ~ (10/100)² = 1/100


def test_high_temperature_gradient_approaches_logit_difference_over_c_n_t_squared():
    # Hinton et al. (2015): for zero-mean logits, q − p ≈ (z − v)/(C T), so ∂KL/∂z = (q − p)/(N T) ≈
    # (z − v)/(C N T²) (Hinton's "N" is the number of classes C; here N is the batch).
    z, v = _student_teacher()
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    errors = []
    for T in (5.0, 10.0, 20.0, 50.0):
        limit = (z - v) / (CLASSES * BATCH * T * T)
        gradient = _kd_gradient(z, v, T, scale=1 / T**2)  # the KL alone, before the T² factor
        errors.append(float((gradient - limit).norm() / limit.norm()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.03, errors


def test_kl_equals_cross_entropy_minus_entropy():
    z, v = _student_teacher()
    p, log_q = F.softmax(v, -1), F.log_softmax(z, -1)
    cross_entropy = -(p * log_q).sum(-1).mean()  # CE(p, q)
    entropy = -(p * p.log()).sum(-1).mean()  # H(p)
    torch.testing.assert_close(distill.kl_divergence(z, v), cross_entropy - entropy)  # not H(p) − CE(p, q)


def test_minimising_kl_and_soft_cross_entropy_give_the_same_gradient():
    z, v = _student_teacher()
    z_kl, z_ce = z.clone().requires_grad_(), z.clone().requires_grad_()
    distill.kd_loss(z_kl, v, T=3.0).backward()
    (9.0 * -(F.softmax(v / 3.0, -1) * F.log_softmax(z_ce / 3.0, -1)).sum(-1).mean()).backward()  # T² CE(p, q)
    torch.testing.assert_close(z_kl.grad, z_ce.grad)


def test_kd_loss_is_t_squared_times_forward_kl_divergence():
    z, v = _student_teacher()
    torch.testing.assert_close(distill.kd_loss(z, v, 3.0), 9.0 * distill.kl_divergence(z, v, "forward", T=3.0))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_divergence_takes_the_student_first_like_every_loss_and_f_kl_div(direction):
    z, v = _student_teacher()  # student, teacher
    log_q, log_p = F.log_softmax(z, -1), F.log_softmax(v, -1)
    if direction == "forward":  # KL(p ‖ q): F.kl_div(input=log q, target=log p), student as the input
        expected = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    else:  # KL(q ‖ p): the roles swapped
        expected = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    torch.testing.assert_close(distill.kl_divergence(z, v, direction), expected)
    torch.testing.assert_close(distill.kl_divergence(student_logits=z, teacher_logits=v, direction=direction),
                               expected)


def test_distillation_loss_with_alpha_one_is_kd_loss():
    z, v = _student_teacher()
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(distill.distillation_loss(z, v, labels, T=2.0, alpha=1.0), distill.kd_loss(z, v, 2.0))


def test_distillation_loss_with_alpha_zero_is_cross_entropy_at_temperature_one():
    z, v = _student_teacher()
    labels = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(distill.distillation_loss(z, v, labels, T=2.0, alpha=0.0), F.cross_entropy(z, labels))


def test_alpha_weights_the_soft_term():
    z, v = _student_teacher()
    labels = torch.tensor([0, 1, 2, 3])
    expected = 0.9 * distill.kd_loss(z, v, 2.0) + 0.1 * F.cross_entropy(z, labels)
    torch.testing.assert_close(distill.distillation_loss(z, v, labels, T=2.0, alpha=0.9), expected)


def test_rows_labelled_ignore_index_are_left_out_of_both_terms():
    z, v = _student_teacher()
    labels = torch.tensor([0, -100, 2, -100])
    kept = torch.tensor([0, 2])
    expected = distill.distillation_loss(z[kept], v[kept], labels[kept], T=2.0, alpha=0.3)
    torch.testing.assert_close(distill.distillation_loss(z, v, labels, T=2.0, alpha=0.3), expected)
    z_changed = z.clone()
    z_changed[1] += 5.0  # an ignored row
    torch.testing.assert_close(distill.distillation_loss(z_changed, v, labels, T=2.0, alpha=0.3), expected)


# --------------------------------------------------------------------------- chapter 7: intermediate layers


def test_hidden_state_loss_is_zero_for_identical_states_and_positive_otherwise():
    hidden = _logits(2, 3, 8)
    assert distill.hidden_state_loss(hidden, hidden.clone()) == 0
    assert distill.hidden_state_loss(hidden, hidden + 0.1) > 0


def test_hidden_state_loss_uses_the_projection_when_widths_differ():
    student, teacher = _logits(2, 3, 4), _logits(2, 3, 8, seed=1)
    torch.manual_seed(0)
    projection = distill.HiddenProjection(4, 8).double()
    expected = F.mse_loss(projection(student), teacher)
    torch.testing.assert_close(distill.hidden_state_loss(student, teacher, projection), expected)


def test_hidden_state_loss_ignores_padded_tokens():
    student, teacher = _logits(2, 3, 8), _logits(2, 3, 8, seed=1)
    attention_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = distill.hidden_state_loss(student, teacher, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(loss, F.mse_loss(student[real], teacher[real]))  # mean over 3 real tokens
    changed = student.clone()
    changed[~real] = 100.0
    torch.testing.assert_close(distill.hidden_state_loss(changed, teacher, attention_mask=attention_mask), loss)


def _attention_weights(seed, attention_mask, heads=2):
    """(batch, heads, L, L) softmax weights with zero weight on padded keys, as a BERT returns them."""
    batch, seq = attention_mask.shape
    scores = _logits(batch, heads, seq, seq, seed=seed)
    return scores.masked_fill(attention_mask[:, None, None, :] == 0, -math.inf).softmax(-1)


def test_attention_loss_is_zero_for_identical_maps_and_positive_otherwise():
    attention_mask = torch.ones(2, 4)
    teacher = _attention_weights(0, attention_mask)
    assert distill.attention_loss(teacher.clone(), teacher) == 0
    assert distill.attention_loss(_attention_weights(1, attention_mask), teacher) > 0


def test_attention_loss_equals_a_hand_computed_kl_with_a_padded_key():
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]]], dtype=torch.float64)  # (1, 1, 2 queries, 3 keys)
    student = torch.tensor([[[[0.25, 0.75, 0.0], [0.6, 0.4, 0.0]]]], dtype=torch.float64)
    row_1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row_2 = 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)
    assert distill.attention_loss(student, teacher).item() == pytest.approx((row_1 + row_2) / 2, rel=1e-12)


def test_attention_loss_ignores_padded_query_rows():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    student, teacher = _attention_weights(1, attention_mask), _attention_weights(0, attention_mask)
    loss = distill.attention_loss(student, teacher, attention_mask)
    changed = student.clone()
    changed[1, :, 2:] = torch.tensor([0.7, 0.3, 0.0, 0.0], dtype=torch.float64)  # padded queries of example 2
    torch.testing.assert_close(distill.attention_loss(changed, teacher, attention_mask), loss)
    assert not torch.isclose(distill.attention_loss(changed, teacher), distill.attention_loss(student, teacher))


def test_attention_loss_has_no_nan_in_value_or_gradient_with_masked_keys():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    teacher = _attention_weights(0, attention_mask)
    scores = _logits(2, 2, 4, 4, seed=1).requires_grad_()
    student = scores.masked_fill(attention_mask[:, None, None, :] == 0, -math.inf).softmax(-1)
    loss = distill.attention_loss(student, teacher, attention_mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


# --------------------------------------------------------------------------- chapter 8: top-k KD, KL directions


@pytest.mark.parametrize("tail", ["renormalise", "bucket"])
def test_topk_kd_loss_with_k_equal_to_vocabulary_is_kd_loss(tail):
    z, v = _logits(2, 3, CLASSES), _logits(2, 3, CLASSES, seed=1)  # (batch, seq, vocab)
    values, indices = distill.topk_teacher(v, k=CLASSES, T=2.0)
    torch.testing.assert_close(distill.topk_kd_loss(z, values, indices, T=2.0, tail=tail), distill.kd_loss(z, v, 2.0))


P_TEACHER, Q_STUDENT = [0.5, 0.3, 0.15, 0.05], [0.4, 0.2, 0.3, 0.1]  # top-2 of the teacher: tokens 0 and 1


def _tiny_topk(tail):
    v, z = torch.tensor([P_TEACHER], dtype=torch.float64).log(), torch.tensor([Q_STUDENT], dtype=torch.float64).log()
    values, indices = distill.topk_teacher(v, k=2)
    return distill.topk_kd_loss(z, values, indices, tail=tail).item()


def test_topk_bucket_equals_a_hand_computed_kl_over_k_plus_one_outcomes():
    # outcomes {0}, {1}, {2, 3}: teacher (0.5, 0.3, 0.2), student (0.4, 0.2, 0.4)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    assert _tiny_topk("bucket") == pytest.approx(expected, rel=1e-12)


def test_topk_renormalise_equals_a_hand_computed_kl_of_the_renormalised_teacher():
    # p̃ = (0.5, 0.3) / 0.8 = (0.625, 0.375) against the student's full-softmax q = (0.4, 0.2)
    expected = 0.625 * math.log(0.625 / 0.4) + 0.375 * math.log(0.375 / 0.2)
    assert _tiny_topk("renormalise") == pytest.approx(expected, rel=1e-12)


def test_topk_bucket_lies_between_zero_and_the_full_kl():
    z, v = _logits(8, 50), _logits(8, 50, seed=1)
    full = distill.kd_loss(z, v, T=1.0)
    for k in (1, 5, 20, 49):
        values, indices = distill.topk_teacher(v, k)
        bucket = distill.topk_kd_loss(z, values, indices, tail="bucket")
        assert 0 <= bucket <= full, (k, bucket, full)


def test_topk_kd_loss_averages_over_unmasked_positions_only():
    z, v = _logits(2, 3, 10), _logits(2, 3, 10, seed=1)
    values, indices = distill.topk_teacher(v, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    real = mask.bool()
    expected = distill.topk_kd_loss(z[real], values[real], indices[real])
    torch.testing.assert_close(distill.topk_kd_loss(z, values, indices, mask=mask), expected)


def test_forward_kl_covers_both_modes_and_reverse_kl_seeks_one():
    x = torch.linspace(-5, 5, 201, dtype=torch.float64)  # a 1-D categorical over 201 points
    bimodal = torch.logaddexp(-(x - 2.5) ** 2 / 0.5, -(x + 2.5) ** 2 / 0.5)  # modes at ±2.5, σ = 0.5
    mu = torch.linspace(-4, 4, 81, dtype=torch.float64)
    sigma = torch.logspace(math.log10(0.3), math.log10(4), 30, dtype=torch.float64)
    grid_mu, grid_sigma = (t.reshape(-1, 1) for t in torch.meshgrid(mu, sigma, indexing="ij"))
    students = -(x - grid_mu) ** 2 / (2 * grid_sigma**2)  # one discretised Gaussian per (μ, σ): (2430, 201)
    teacher = bimodal.expand_as(students)
    best = {}
    for direction in ("forward", "reverse"):
        kl = distill.kl_divergence(students, teacher, direction, reduction="none")
        best[direction] = float(grid_mu[kl.argmin()]), float(grid_sigma[kl.argmin()])
    assert abs(best["forward"][0]) < 0.2 and best["forward"][1] > 2.0, best  # between the modes, wide
    assert abs(abs(best["reverse"][0]) - 2.5) < 0.2 and best["reverse"][1] < 0.8, best  # on one mode, narrow


# --------------------------------------------------------------------------- chapter 7: DistillationTrainer


def _tiny_bert(hidden, layers, seed, initializer_range=0.02):
    """A BertForSequenceClassification without dropout; a wide initializer_range gives diverse, confident logits."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        initializer_range=initializer_range)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def trainer_setup(tmp_path_factory):
    from transformers import TrainingArguments

    input_ids = torch.randint(1, 50, (8, 8), generator=torch.Generator().manual_seed(0))
    teacher, student = _tiny_bert(32, 2, seed=0, initializer_range=0.5), _tiny_bert(16, 1, seed=1)
    with torch.no_grad():
        labels = teacher(input_ids).logits.argmax(-1)  # a task the student can learn: (8,), both classes occur
    dataset = [{"input_ids": input_ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
               for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("distill")), per_device_train_batch_size=4,
                             max_steps=10, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = distill.DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher_model=teacher,
                                          temperature=2.0, alpha=0.7)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(8, 8, dtype=torch.long), "labels": labels}
    return trainer, teacher, student, batch


def test_trainer_compute_loss_is_exactly_distillation_loss(trainer_setup):
    trainer, teacher, student, batch = trainer_setup
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = distill.distillation_loss(student(**inputs).logits, teacher(**inputs).logits, batch["labels"],
                                             T=2.0, alpha=0.7)
        loss = trainer.compute_loss(student, dict(batch))
    torch.testing.assert_close(loss, expected)


def test_trainer_steps_lower_the_loss_and_leave_the_teacher_unchanged(trainer_setup):
    trainer, teacher, student, batch = trainer_setup
    teacher_before = {name: p.clone() for name, p in teacher.named_parameters()}
    with torch.no_grad():
        before = trainer.compute_loss(student, dict(batch))
    trainer.train()  # 10 steps of 4 examples
    with torch.no_grad():
        after = trainer.compute_loss(student, dict(batch))
    assert after < 0.9 * before, (before, after)
    assert not teacher.training
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, teacher_before[name]), name


def test_gradient_accumulation_gives_the_update_of_one_large_batch(trainer_setup, tmp_path):
    from transformers import TrainingArguments

    _, teacher, _, batch = trainer_setup
    dataset = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(8)]
    weights = []
    for accumulation in (1, 2):  # one batch of 8, or two of 4 accumulated; SGD, as Adam hides a scale error
        student = _tiny_bert(16, 1, seed=1)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8 // accumulation,
                                 gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True)
        distill.DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher_model=teacher).train()
        weights.append(student.classifier.weight.detach().clone())
    torch.testing.assert_close(weights[1], weights[0])


def test_causal_lm_trainer_with_alpha_zero_reproduces_the_models_own_shifted_loss(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    def tiny_gpt2(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    student, teacher = tiny_gpt2(0), tiny_gpt2(1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = distill.DistillationTrainer(model=student, args=args, teacher_model=teacher, alpha=0.0, causal_lm=True)
    input_ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # as DataCollatorForLanguageModeling makes them
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        expected = student(**batch).loss  # Hugging Face shifts the labels inside the model
        torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), expected)


def test_import_does_not_import_transformers():
    code = "import sys, lightlm.distill; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- errors


Z, V = _logits(2, 5), _logits(2, 5, seed=1)
LABELS = torch.tensor([0, 1])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: distill.kd_loss(Z, V, T=0), ValueError, "temperature T must be > 0, got 0"),
        (lambda: distill.kd_loss(Z, V, T=-1.0), ValueError, "temperature T must be > 0, got -1.0"),
        (lambda: distill.softmax_t(Z, T=math.inf), ValueError, "temperature T must be finite, got inf"),
        (lambda: distill.kd_loss(Z, V, T="2"), TypeError, "temperature T must be a real number, got str"),
        (lambda: distill.kd_loss(Z, V[:, :4]), ValueError, "vocabulary mismatch"),
        (lambda: distill.kd_loss(Z, V[:1]), ValueError, "shape mismatch"),
        (lambda: distill.kd_loss(Z.long(), V), TypeError, "student_logits must be a floating-point tensor"),
        (lambda: distill.kd_loss(Z.tolist(), V), TypeError, "student_logits must be a torch.Tensor, got list"),
        (lambda: distill.distillation_loss(Z, V, LABELS, alpha=1.5), ValueError, r"alpha .* \[0, 1\]"),
        (lambda: distill.distillation_loss(Z, V, LABELS, alpha=-0.1), ValueError, r"\[0, 1\]"),
        (lambda: distill.distillation_loss(Z, V, LABELS.float()), TypeError, "labels must be an integer tensor"),
        (lambda: distill.distillation_loss(Z, V, LABELS, alpha="0.5"), TypeError, "alpha .* must be a real number"),
        (lambda: distill.distillation_loss(Z, V, LABELS, ignore_index=-100.0), TypeError,
         "ignore_index must be an int, got float"),
        (lambda: distill.distillation_loss(Z, V, LABELS[:1]), ValueError, "labels must have shape"),
        (lambda: distill.distillation_loss(Z, V, torch.tensor([0, 5])), ValueError, r"\[0, 5\)"),
        (lambda: distill.distillation_loss(Z, V, torch.tensor([-100, -100])), ValueError, "every label"),
        (lambda: distill.kl_divergence(Z, V, "sideways"), ValueError,
         "direction must be one of 'forward', 'reverse'; got 'sideways'"),
        (lambda: distill.kl_divergence(Z, V, reduction="sum"), ValueError, "reduction must be one of 'mean', 'none'"),
        (lambda: distill.kl_divergence(Z, V[:, :4]), ValueError, "vocabulary mismatch: student_logits has 5"),
        (lambda: distill.hidden_state_loss(_logits(2, 3, 4), _logits(2, 3, 8)), ValueError, "HiddenProjection"),
        (lambda: distill.hidden_state_loss(_logits(2, 3, 8), _logits(2, 3, 8), attention_mask=torch.ones(2, 4)),
         ValueError, "attention_mask must have shape"),
        (lambda: distill.hidden_state_loss(_logits(2, 3, 8), _logits(2, 3, 8), attention_mask=torch.zeros(2, 3)),
         ValueError, "every position"),
        (lambda: distill.HiddenProjection(0, 8), ValueError, "d_student must be >= 1, got 0"),
        (lambda: distill.HiddenProjection(8, 4.0), TypeError, "d_teacher must be an int, got float"),
        (lambda: distill.attention_loss(_logits(1, 2, 3, 3), _logits(1, 4, 3, 3)), ValueError, "heads"),
        (lambda: distill.attention_loss(_logits(1, 2, 3, 3), _logits(1, 2, 4, 4)), ValueError, "sequence"),
        (lambda: distill.attention_loss(_logits(2, 3, 3), _logits(2, 3, 3)), ValueError, "batch, heads, L, S"),
        (lambda: distill.topk_teacher(V, k=6), ValueError, r"k \(at most the vocabulary size\) must be in \[1, 5\]"),
        (lambda: distill.topk_teacher(V, k=0), ValueError,
         r"k \(at most the vocabulary size\) must be in \[1, 5\], got 0"),
        (lambda: distill.topk_teacher(V, k=2.0), TypeError, r"k \(at most the vocabulary size\) must be an int"),
        (lambda: distill.topk_kd_loss(Z, _logits(2, 6), torch.zeros(2, 6, dtype=torch.long)), ValueError, "exceed"),
        (lambda: distill.topk_kd_loss(Z, *distill.topk_teacher(V, 2), tail="drop"), ValueError,
         "tail must be one of 'renormalise', 'bucket'; got 'drop'"),
        (lambda: distill.topk_kd_loss(Z, _logits(2, 0), torch.zeros(2, 0, dtype=torch.long)), ValueError,
         "topk_values must have shape .* at least one class"),
        (lambda: distill.topk_kd_loss(Z[:0], _logits(0, 2), torch.zeros(0, 2, dtype=torch.long)), ValueError,
         "holds no token"),
        (lambda: distill.topk_kd_loss(Z[:1], *distill.topk_teacher(V, 2)), ValueError, "leading dims"),
        (lambda: distill.topk_kd_loss(Z, _logits(2, 2), torch.tensor([[0, 9], [1, 2]])), ValueError, r"\[0, 5\)"),
        (lambda: distill.topk_kd_loss(Z, _logits(2, 2), torch.zeros(2, 2)), TypeError,
         "topk_indices must be an integer tensor"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_trainer_rejects_a_bad_alpha_before_building_anything(tmp_path):
    with pytest.raises(ValueError, match=r"alpha .* \[0, 1\], got 2.0"):
        distill.DistillationTrainer(model=_tiny_bert(16, 1, seed=0), teacher_model=_tiny_bert(16, 1, seed=1),
                                    alpha=2.0)
    with pytest.raises(TypeError, match="teacher_model must be a torch.nn.Module, got str"):
        distill.DistillationTrainer(model=_tiny_bert(16, 1, seed=0), teacher_model="teacher")


def test_the_trainer_lives_in_its_own_module_and_distill_still_finds_it():
    import pickle

    from lightlm import distill_trainer

    assert distill.DistillationTrainer is distill_trainer.DistillationTrainer
    assert pickle.loads(pickle.dumps(distill_trainer.DistillationTrainer)) is distill_trainer.DistillationTrainer
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        distill.Trainer


def test_importing_the_trainer_module_does_not_import_transformers():
    code = "import sys, lightlm.distill_trainer; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
