"""lightlm.train: seeding, the training loop and the metrics."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lightlm import train


def test_seed_everything_makes_python_numpy_and_torch_repeat():
    draws = []
    for _ in range(2):
        train.seed_everything(123)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]


def _regression_problem():
    train.seed_everything(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    return batches, nn.Linear(4, 1)


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def test_train_loop_lowers_the_loss_and_counts_steps():
    batches, model = _regression_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = train.train_loop(model, batches, mse, optimizer, epochs=3, progress=False)
    assert len(losses) == 3 * len(batches)
    assert losses[-1] < 0.01 * losses[0]
    assert not model.training


def test_train_loop_with_steps_cycles_through_the_batches():
    batches, model = _regression_problem()
    seen = []

    def counting_loss(model, batch):
        seen.append(id(batch))
        return mse(model, batch)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = train.train_loop(model, batches, counting_loss, optimizer, steps=20, progress=False)
    assert len(losses) == 20
    assert seen[:8] == seen[8:16] == [id(b) for b in batches]


def test_train_loop_clips_the_gradient_norm():
    batches, model = _regression_problem()
    norms = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            return super().step(closure)

    optimizer = Recording(model.parameters(), lr=0.01)
    train.train_loop(model, batches, mse, optimizer, steps=5, max_grad_norm=0.5, progress=False)
    assert max(norms) <= 0.5 + 1e-5


def test_evaluate_weights_batches_by_their_size():
    model = nn.Identity()
    batches = [(torch.tensor([[0.0, 1.0]] * 3), torch.tensor([1, 1, 1])),
               (torch.tensor([[1.0, 0.0]]), torch.tensor([1]))]
    value = train.evaluate(model, batches, lambda m, b: (train.accuracy(m(b[0]), b[1]), len(b[1])))
    assert value == pytest.approx(3 / 4)  # not the mean of the batch accuracies (0.5)


def test_accuracy_and_perplexity():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert train.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert train.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert train.perplexity(torch.tensor(0.0)) == 1.0


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    vocab = 37
    logits = torch.zeros(5, vocab)
    nll = nn.functional.cross_entropy(logits, torch.randint(vocab, (5,)))
    assert train.perplexity(nll) == pytest.approx(vocab, rel=1e-5)


def test_train_loop_refuses_a_one_shot_iterator_for_several_epochs():
    batches, model = _regression_problem()  # 8 batches
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(TypeError, match="epochs=3 needs batches that can be iterated again .* one-shot iterator"):
        train.train_loop(model, (b for b in batches), mse, optimizer, epochs=3, progress=False)
    losses = train.train_loop(model, iter(batches), mse, optimizer, epochs=1, progress=False)  # one pass: fine
    assert len(losses) == len(batches)
    assert len(train.train_loop(model, (b for b in batches), mse, optimizer, steps=5, progress=False)) == 5


def test_train_loop_with_epochs_runs_epochs_times_the_batches_of_any_re_iterable():
    class Batches:  # re-iterable, no __len__: a fresh iterator per epoch, as a DataLoader gives
        def __iter__(self):
            return iter(batches)

    batches, model = _regression_problem()
    losses = train.train_loop(model, Batches(), mse, torch.optim.SGD(model.parameters(), lr=0.05), epochs=3,
                              progress=False)
    assert len(losses) == 3 * len(batches)


def test_train_loop_refuses_empty_batches_in_both_modes():
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batches is empty"):
        train.train_loop(model, [], mse, optimizer, epochs=2, progress=False)
    with pytest.raises(ValueError, match="batches ran out"):
        train.train_loop(model, [], mse, optimizer, steps=2, progress=False)


def test_train_loop_and_evaluate_leave_the_model_in_eval_mode():
    batches, model = _regression_problem()
    model.train()
    train.train_loop(model, batches, mse, torch.optim.SGD(model.parameters(), lr=0.05), steps=2, progress=False)
    assert not model.training
    model.train()
    train.evaluate(model, batches, lambda m, b: (mse(m, b).item(), len(b[1])))
    assert not model.training


def test_perplexity_of_a_huge_loss_is_infinite():
    assert train.perplexity(800.0) == math.inf
    assert train.perplexity(torch.tensor(1e4)) == math.inf
    assert train.perplexity(700.0) == pytest.approx(math.exp(700.0))


def test_pad_right_pads_like_a_hugging_face_tokenizer():
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1})),
                                        pad_token="[PAD]", padding_side="right")
    sequences = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10], dtype=torch.int32)]
    expected = DataCollatorWithPadding(tokenizer)([{"input_ids": seq.tolist()} for seq in sequences])
    input_ids, attention_mask = train.pad(sequences)
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(attention_mask, expected["attention_mask"])
    ids, mask = train.pad((torch.tensor([1, 2]), torch.tensor([3])), pad_id=7)
    assert ids.tolist() == [[1, 2], [3, 7]] and mask.tolist() == [[1, 1], [1, 0]]


_LINEAR = nn.Linear(1, 1)
_SGD = torch.optim.SGD(_LINEAR.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: train.seed_everything("0"), TypeError, "seed must be an int, got str"),
        (lambda: train.seed_everything(-1), ValueError, r"seed must be in \[0, 4294967295\], got -1"),
        (lambda: train.seed_everything(2**32), ValueError, r"seed must be in \[0, 4294967295\], got 4294967296"),
        (lambda: train.accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)), ValueError, "disagree"),
        (lambda: train.accuracy([[0.1, 0.9]], torch.zeros(1, dtype=torch.long)), TypeError,
         "logits must be a torch.Tensor, got list"),
        (lambda: train.accuracy(torch.zeros(3, 2), [0, 1, 1]), TypeError, "labels must be a torch.Tensor, got list"),
        (lambda: train.accuracy(torch.zeros(3, 2), torch.zeros(3)), TypeError, "labels must be an integer tensor"),
        (lambda: train.accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
        (lambda: train.perplexity(-0.5), ValueError, r"mean_nll \(a mean negative log-likelihood\) must be >= 0"),
        (lambda: train.perplexity(float("nan")), ValueError, "must be a number, got nan"),
        (lambda: train.perplexity("2.0"), TypeError, "must be a real number, got str"),
        (lambda: train.perplexity(torch.ones(3)), ValueError, r"one real number, got a tensor of shape \(3,\)"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, steps=0), ValueError, "steps must be >= 1, got 0"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, steps=True), TypeError, "steps must be an int, got bool"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, steps=2.0), TypeError, "steps must be an int, got float"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, steps=3, progress=False), ValueError, "batches ran out"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, epochs=0), ValueError, "epochs must be >= 1, got 0"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, epochs="2"), TypeError, "epochs must be an int, got str"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, max_grad_norm=0), ValueError, "max_grad_norm must be > 0"),
        (lambda: train.train_loop(_LINEAR, [], mse, _SGD, max_grad_norm="1"), TypeError, "max_grad_norm must be a"),
        (lambda: train.train_loop("model", [], mse, _SGD), TypeError, "model must be a torch.nn.Module, got str"),
        (lambda: train.train_loop(_LINEAR, [], "mse", _SGD), TypeError, "loss_fn must be callable, got str"),
        (lambda: train.train_loop(_LINEAR, [], mse, "sgd"), TypeError, "optimizer must be a torch.optim.Optimizer"),
        (lambda: train.train_loop(_LINEAR, 5, mse, _SGD), TypeError, "batches must be an iterable of batches"),
        (lambda: train.train_loop(_LINEAR, [(torch.ones(1, 1), torch.ones(1))], lambda m, b: 1.0, _SGD, steps=1,
                                  progress=False), TypeError, "loss_fn must return a scalar tensor, got float"),
        (lambda: train.evaluate(nn.Identity(), [], lambda m, b: (1.0, 1)), ValueError, "no examples were evaluated"),
        (lambda: train.evaluate(nn.Identity(), [], "accuracy"), TypeError, "metric_fn must be callable"),
        (lambda: train.pad([]), ValueError, "at least one sequence"),
        (lambda: train.pad(torch.tensor([1, 2])), TypeError, "sequences must be a list or tuple"),
        (lambda: train.pad([[1, 2]]), TypeError, r"sequences\[0\] must be a torch.Tensor, got list"),
        (lambda: train.pad([torch.tensor([1, 2]), torch.tensor([1.0])]), TypeError,
         r"sequences\[1\] must be an integer tensor, got dtype torch.float32"),
        (lambda: train.pad([torch.tensor([[1, 2]])]), ValueError, r"sequences\[0\] must be 1-D, got shape \(1, 2\)"),
        (lambda: train.pad([torch.tensor([1, 2])], pad_id=-1), ValueError, "pad_id must be >= 0, got -1"),
        (lambda: train.pad([torch.tensor([1, 2])], pad_id=0.0), TypeError, "pad_id must be an int, got float"),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_train_loop_rejects_a_non_scalar_loss():
    batches, model = _regression_problem()
    with pytest.raises(ValueError, match="scalar"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train.train_loop(model, batches, lambda m, b: m(b[0]), optimizer, steps=1, progress=False)
