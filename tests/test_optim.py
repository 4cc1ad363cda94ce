"""lightlm.optim against torch.optim.Adam / AdamW and against the formulas of chapter 5."""

import copy
import math

import pytest
import torch
from torch import nn

from lightlm import optim

STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _regression_problem(seed=0):
    """A seeded 2-layer MLP and random regression data (64 samples, 8 features, 1 target)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    inputs = torch.randn(64, 8, generator=generator)
    targets = torch.randn(64, 1, generator=generator)
    return model, inputs, targets


def _train(model, optimizer, inputs, targets, steps=STEPS):
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return model


def _ours_and_theirs(ours_class, theirs_class, group_fn=None, **options):
    model, inputs, targets = _regression_problem()
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    params = group_fn or (lambda m: m.parameters())
    _train(ours_model, ours_class(params(ours_model), **options), inputs, targets)
    _train(theirs_model, theirs_class(params(theirs_model), **options), inputs, targets)
    return ours_model, theirs_model


def _assert_same_parameters(ours_model, theirs_model):
    for ours, theirs in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


PAIRS = [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)]


@pytest.mark.parametrize("ours_class, theirs_class", PAIRS, ids=["Adam", "AdamW"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_after_100_steps(ours_class, theirs_class, weight_decay):
    ours, theirs = _ours_and_theirs(ours_class, theirs_class, lr=1e-2, weight_decay=weight_decay)
    _assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("ours_class, theirs_class", PAIRS, ids=["Adam", "AdamW"])
def test_matches_torch_with_default_arguments(ours_class, theirs_class):
    ours, theirs = _ours_and_theirs(ours_class, theirs_class)  # AdamW's default weight_decay is 1e-2
    _assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("ours_class, theirs_class", PAIRS, ids=["Adam", "AdamW"])
def test_matches_torch_with_two_param_groups_of_different_lr(ours_class, theirs_class):
    def groups(model):  # the hidden layer slow and decayed, the output layer fast
        return [{"params": model[0].parameters(), "lr": 1e-3, "weight_decay": 0.05},
                {"params": model[2].parameters(), "lr": 3e-2}]

    ours, theirs = _ours_and_theirs(ours_class, theirs_class, group_fn=groups, weight_decay=0.1)
    _assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("ours_class, theirs_class", PAIRS, ids=["Adam", "AdamW"])
def test_matches_torch_with_amsgrad(ours_class, theirs_class):
    ours, theirs = _ours_and_theirs(ours_class, theirs_class, lr=1e-2, weight_decay=0.1, amsgrad=True)
    _assert_same_parameters(ours, theirs)


@pytest.mark.parametrize("ours_class, theirs_class", PAIRS, ids=["Adam", "AdamW"])
def test_agrees_with_torch_bit_for_bit_on_cpu(ours_class, theirs_class):
    # same operations in the same order as torch's single-tensor path (the one it uses on CPU)
    ours, theirs = _ours_and_theirs(ours_class, theirs_class, lr=1e-2, weight_decay=0.1)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_first_step_matches_the_hand_formula_on_a_scalar():
    theta0, grad, lr, beta1, beta2, eps = 1.0, 0.5, 0.1, 0.9, 0.999, 1e-8
    m = (1 - beta1) * grad                       # m_1 = (1 − β1)·g
    v = (1 - beta2) * grad**2                    # v_1 = (1 − β2)·g²
    m_hat, v_hat = m / (1 - beta1), v / (1 - beta2)
    expected = theta0 - lr * m_hat / (math.sqrt(v_hat) + eps)  # = θ0 − lr·g/(|g| + ε) on step 1
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    optimizer = optim.Adam([theta], lr=lr, betas=(beta1, beta2), eps=eps)
    theta.grad = torch.tensor([grad], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(theta.detach(), torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-15)


def test_l2_and_decoupled_decay_leave_different_parameters():
    adam_l2, _ = _ours_and_theirs(optim.Adam, torch.optim.Adam, lr=1e-2, weight_decay=0.1)
    adamw, _ = _ours_and_theirs(optim.AdamW, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    difference = max((a - b).abs().max().item() for a, b in zip(adam_l2.parameters(), adamw.parameters()))
    assert difference > 1e-3


def test_adamw_decay_is_lr_times_lambda_theta_while_l2_decay_is_divided_by_sqrt_v_hat():
    lr, weight_decay, theta0 = 0.1, 0.01, 2.0
    results = {}
    for cls in (optim.Adam, optim.AdamW):
        theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
        optimizer = cls([theta], lr=lr, weight_decay=weight_decay)
        theta.grad = torch.zeros_like(theta)  # no loss gradient: only the decay acts
        optimizer.step()
        results[cls.__name__] = theta.item()
    # AdamW: θ ← θ − lr·λ·θ, untouched by m and v (which stay 0)
    assert results["AdamW"] == pytest.approx(theta0 * (1 - lr * weight_decay), abs=1e-15)
    # Adam: g = λθ, so m̂ / √v̂ = λθ / |λθ| = 1 and the step is lr, whatever λ is
    l2_term = weight_decay * theta0
    assert results["Adam"] == pytest.approx(theta0 - lr * l2_term / (abs(l2_term) + 1e-8), abs=1e-12)
    assert theta0 - results["Adam"] == pytest.approx(lr, rel=1e-6)  # 50× the decoupled shrink of 0.002


def test_adamw_shrinks_every_weight_alike_whatever_its_gradient_scale():
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)  # three weights, gradients of very different size
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn((), generator=generator, dtype=torch.float64) * scales for _ in range(20)]
    final = {}
    for cls in (optim.Adam, optim.AdamW):
        theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
        optimizer = cls([theta], lr=1e-2, weight_decay=0.1)
        for gradient in gradients:  # the same gradient direction, scaled per weight
            theta.grad = gradient.clone()
            optimizer.step()
        final[cls.__name__] = theta.detach()
    # Adam's update is invariant to gradient scale, and AdamW's decay does not see the gradient: all alike
    torch.testing.assert_close(final["AdamW"], final["AdamW"][1].expand(3), rtol=0, atol=1e-6)
    # With L2 the decay term λθ is normalised together with the gradient: it dominates where g is small
    spread = (final["Adam"].max() - final["Adam"].min()).item()
    assert spread > 0.05


def test_state_dict_round_trip_continues_training_identically():
    model, inputs, targets = _regression_problem()
    straight, resumed = copy.deepcopy(model), copy.deepcopy(model)
    _train(straight, optim.AdamW(straight.parameters(), lr=1e-2), inputs, targets)
    first = optim.AdamW(resumed.parameters(), lr=1e-2)
    _train(resumed, first, inputs, targets, steps=STEPS // 2)
    second = optim.AdamW(resumed.parameters(), lr=1e-2)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _train(resumed, second, inputs, targets, steps=STEPS - STEPS // 2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_from_torch_adam_loads_into_ours():
    model, inputs, targets = _regression_problem()
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-2, weight_decay=0.1), inputs, targets)
    warm = torch.optim.Adam(ours.parameters(), lr=1e-2, weight_decay=0.1)
    _train(ours, warm, inputs, targets, steps=STEPS // 2)
    ours_optimizer = optim.Adam(ours.parameters(), lr=1e-2, weight_decay=0.1)
    ours_optimizer.load_state_dict(warm.state_dict())
    _train(ours, ours_optimizer, inputs, targets, steps=STEPS - STEPS // 2)
    _assert_same_parameters(ours, theirs)


def test_step_returns_the_closure_loss_and_skips_parameters_without_gradient():
    used = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    optimizer = optim.Adam([used, unused], lr=0.1)

    def closure():
        loss = (used**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 2.0
    assert torch.equal(unused.detach(), torch.ones(2)) and not optimizer.state[unused]
    assert torch.all(used < 1)


@pytest.mark.parametrize(
    "options, error, argument",
    [
        ({"lr": -1e-3}, ValueError, "lr must be >= 0, got -0.001"),
        ({"lr": "0.001"}, TypeError, "lr must be a real number, got str"),
        ({"lr": float("inf")}, ValueError, "lr must be finite"),
        ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
        ({"betas": (0.9, "0.99")}, TypeError, r"betas\[1\] must be a real number, got str"),
        ({"betas": 0.9}, TypeError, r"betas must be a pair \(beta1, beta2\), got float"),
        ({"betas": (0.9, 0.99, 0.999)}, ValueError, "betas must be a pair .* got 3 values"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"eps": -1e-8}, ValueError, "eps must be > 0"),
        ({"weight_decay": -0.01}, ValueError, "weight_decay must be >= 0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay must be a number, got nan"),
        ({"amsgrad": 1}, TypeError, "amsgrad must be True or False, got int"),
    ],
)
@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
def test_rejects_bad_hyperparameters_naming_the_argument(cls, options, error, argument):
    with pytest.raises(error, match=argument):
        cls([torch.zeros(2, requires_grad=True)], **options)


def test_rejects_a_bad_option_inside_a_param_group():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optim.AdamW([{"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0}])


def test_rejects_sparse_gradients():
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = optim.Adam(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="SparseAdam"):
        optimizer.step()
