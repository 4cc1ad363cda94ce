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
    losses = train.train_loop(model, batches, mse, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, progress=False)
    assert len(losses) == 3 * len(batches)
    assert losses[-1] < 0.01 * losses[0]
    assert not model.training


def test_train_loop_with_steps_cycles_through_the_batches():
    batches, model = _regression_problem()
    seen = []

    def counting_loss(model, batch):
        seen.append(id(batch))
        return mse(model, batch)

    losses = train.train_loop(model, batches, counting_loss, torch.optim.SGD(model.parameters(), lr=0.05), steps=20, progress=False)
    assert len(losses) == 20
    assert seen[:8] == seen[8:16] == [id(b) for b in batches]


def test_train_loop_clips_the_gradient_norm():
    batches, model = _regression_problem()
    norms = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            return super().step(closure)

    train.train_loop(model, batches, mse, Recording(model.parameters(), lr=0.01), steps=5, max_grad_norm=0.5, progress=False)
    assert max(norms) <= 0.5 + 1e-5


def test_evaluate_weights_batches_by_their_size():
    model = nn.Identity()
    batches = [(torch.tensor([[0.0, 1.0]] * 3), torch.tensor([1, 1, 1])), (torch.tensor([[1.0, 0.0]]), torch.tensor([1]))]
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


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: train.seed_everything("0"), TypeError),
        (lambda: train.seed_everything(-1), ValueError),
        (lambda: train.accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)), ValueError),
        (lambda: train.perplexity(-0.5), ValueError),
        (lambda: train.perplexity(float("nan")), ValueError),
        (lambda: train.train_loop(nn.Linear(1, 1), [], mse, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), steps=0), ValueError),
        (lambda: train.train_loop(nn.Linear(1, 1), [], mse, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), steps=3, progress=False), ValueError),
        (lambda: train.train_loop(nn.Linear(1, 1), [], mse, torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), epochs=0), ValueError),
        (lambda: train.evaluate(nn.Identity(), [], lambda m, b: (1.0, 1)), ValueError),
    ],
)
def test_rejects_bad_input_with_a_clear_error(call, error):
    with pytest.raises(error):
        call()


def test_train_loop_rejects_a_non_scalar_loss():
    batches, model = _regression_problem()
    with pytest.raises(ValueError, match="scalar"):
        train.train_loop(model, batches, lambda m, b: m(b[0]), torch.optim.SGD(model.parameters(), lr=0.1), steps=1, progress=False)
