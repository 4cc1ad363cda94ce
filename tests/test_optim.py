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


# --------------------------------------------------------------------------- warm-up + cosine, gradient clipping


@pytest.mark.parametrize("warmup_steps, total_steps", [(0, 1), (0, 10), (3, 10), (10, 100), (99, 100)])
def test_warmup_cosine_equals_transformers_schedule_times_peak(warmup_steps, total_steps):
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    for step in range(total_steps + 1):
        expected = 3e-3 * schedule.lr_lambdas[0](step)
        assert optim.warmup_cosine(step, warmup_steps, total_steps, 3e-3) == pytest.approx(expected, rel=1e-12)


def test_warmup_cosine_with_min_lr_equals_transformers_min_lr_schedule():
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    schedule = transformers.get_cosine_with_min_lr_schedule_with_warmup(optimizer, 5, 40, min_lr_rate=0.1)
    for step in range(41):
        expected = 2e-3 * schedule.lr_lambdas[0](step)
        assert optim.warmup_cosine(step, 5, 40, 2e-3, min_lr=2e-4) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_warmup_cosine_hits_its_landmarks_and_stays_at_min_lr_after_the_end():
    assert optim.warmup_cosine(0, 10, 110, 1.0) == 0.0  # warm-up starts at 0
    assert optim.warmup_cosine(5, 10, 110, 1.0) == pytest.approx(0.5)  # linear
    assert optim.warmup_cosine(10, 10, 110, 1.0) == pytest.approx(1.0)  # peak
    assert optim.warmup_cosine(60, 10, 110, 1.0, min_lr=0.2) == pytest.approx(0.6)  # half-way: the mid-point
    assert optim.warmup_cosine(110, 10, 110, 1.0, min_lr=0.2) == pytest.approx(0.2)
    assert optim.warmup_cosine(500, 10, 110, 1.0, min_lr=0.2) == pytest.approx(0.2)


def test_warmup_cosine_scheduler_steps_an_optimizer_like_transformers_and_keeps_each_group_peak():
    transformers = pytest.importorskip("transformers")
    ours_params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    theirs_params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    ours_opt = torch.optim.AdamW([{"params": ours_params[:1], "lr": 1e-3}, {"params": ours_params[1:], "lr": 4e-3}])
    theirs_opt = torch.optim.AdamW([{"params": theirs_params[:1], "lr": 1e-3},
                                    {"params": theirs_params[1:], "lr": 4e-3}])
    ours = optim.warmup_cosine_scheduler(ours_opt, 4, 20)
    theirs = transformers.get_cosine_schedule_with_warmup(theirs_opt, 4, 20)
    for step in range(20):
        for group, reference in zip(ours_opt.param_groups, theirs_opt.param_groups):
            assert group["lr"] == pytest.approx(reference["lr"], rel=1e-12, abs=1e-18)
        assert ours_opt.param_groups[1]["lr"] == pytest.approx(optim.warmup_cosine(step, 4, 20, 4e-3), abs=1e-15)
        for opt in (ours_opt, theirs_opt):
            opt.step()
        ours.step()
        theirs.step()


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((-1, 0, 10, 1.0), ValueError, "step must be >= 0, got -1"),
        ((1.5, 0, 10, 1.0), TypeError, "step must be an int, got float"),
        ((0, 10, 10, 1.0), ValueError, r"warmup_steps must be < total_steps \(10\), got 10"),
        ((0, -1, 10, 1.0), ValueError, "warmup_steps must be >= 0"),
        ((0, 0, 0, 1.0), ValueError, "total_steps must be >= 1, got 0"),
        ((0, 0, True, 1.0), TypeError, "total_steps must be an int, got bool"),
        ((0, 0, 10, -1.0), ValueError, "peak_lr must be >= 0"),
        ((0, 0, 10, "1e-3"), TypeError, "peak_lr must be a real number, got str"),
        ((0, 0, 10, 1e-3, 1e-2), ValueError, r"min_lr must be in \[0, 0.001\], got 0.01"),
    ],
)
def test_warmup_cosine_rejects_bad_arguments_naming_them(args, error, message):
    with pytest.raises(error, match=message):
        optim.warmup_cosine(*args)


def test_warmup_cosine_scheduler_rejects_bad_arguments():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        optim.warmup_cosine_scheduler([], 1, 10)
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\], got 1.5"):
        optim.warmup_cosine_scheduler(optimizer, 1, 10, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        optim.warmup_cosine_scheduler(optimizer, 12, 10)


def _two_layer_grads(seed, scale):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    (model(torch.randn(32, 8)).pow(2).sum() * scale).backward()
    return model


@pytest.mark.parametrize("scale, max_norm", [(1.0, 0.5), (1.0, 1e3), (1e-3, 1.0), (50.0, 1.0), (50.0, math.inf)])
def test_clip_grad_norm_equals_torch_clip_grad_norm_(scale, max_norm):
    ours_model, theirs_model = _two_layer_grads(0, scale), _two_layer_grads(0, scale)
    ours_norm = optim.clip_grad_norm(ours_model.parameters(), max_norm)
    theirs_norm = torch.nn.utils.clip_grad_norm_(theirs_model.parameters(), max_norm)
    torch.testing.assert_close(ours_norm, theirs_norm)
    for ours, theirs in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_clip_grad_norm_caps_the_global_norm_and_keeps_the_direction():
    model = _two_layer_grads(1, 10.0)
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    norm = optim.clip_grad_norm(model.parameters(), 1.0)
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(norm, torch.linalg.vector_norm(before))  # the norm before clipping
    assert norm > 1.0
    torch.testing.assert_close(torch.linalg.vector_norm(after), torch.tensor(1.0))
    torch.testing.assert_close(after, before / torch.linalg.vector_norm(before))


def test_clip_grad_norm_skips_parameters_without_gradient_and_accepts_one_tensor():
    with_grad, without = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    with_grad.grad = torch.tensor([3.0, 4.0, 0.0])
    assert optim.clip_grad_norm([with_grad, without], 10.0).item() == pytest.approx(5.0)
    assert without.grad is None and torch.equal(with_grad.grad, torch.tensor([3.0, 4.0, 0.0]))
    assert optim.clip_grad_norm(with_grad, 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(with_grad.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
    assert optim.clip_grad_norm([without], 1.0).item() == 0.0


@pytest.mark.parametrize(
    "parameters, max_norm, error, message",
    [
        ([torch.ones(2)], 0.0, ValueError, "max_norm must be > 0, got 0.0"),
        ([torch.ones(2)], float("nan"), ValueError, "max_norm must be a number, got nan"),
        ([torch.ones(2)], "1", TypeError, "max_norm must be a real number, got str"),
        (3, 1.0, TypeError, "parameters must be a tensor or an iterable of tensors, got int"),
        ([torch.ones(2), "w"], 1.0, TypeError, r"parameters\[1\] must be a torch.Tensor, got str"),
    ],
)
def test_clip_grad_norm_rejects_bad_arguments(parameters, max_norm, error, message):
    with pytest.raises(error, match=message):
        optim.clip_grad_norm(parameters, max_norm)


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pinned in requirements.txt
    given = None

if given is not None:
    @given(warmup=st.integers(0, 50), decay=st.integers(1, 200), peak=st.floats(1e-6, 1.0),
           min_fraction=st.floats(0.0, 1.0))
    def test_warmup_cosine_rises_during_warmup_then_falls_within_min_and_peak(warmup, decay, peak, min_fraction):
        total, min_lr = warmup + decay, peak * min_fraction
        lrs = [optim.warmup_cosine(step, warmup, total, peak, min_lr) for step in range(total + 1)]
        rising, falling = lrs[:warmup + 1], lrs[warmup:]
        assert all(a <= b for a, b in zip(rising, rising[1:]))  # monotone warm-up, 0 → peak
        assert all(a >= b for a, b in zip(falling, falling[1:]))  # monotone decay, peak → min_lr
        assert all(0.0 <= lr <= peak * (1 + 1e-12) for lr in rising)  # (peak up to float rounding)
        assert all(min_lr * (1 - 1e-12) <= lr <= peak * (1 + 1e-12) for lr in falling)
        assert falling[0] == pytest.approx(peak) and falling[-1] == pytest.approx(min_lr, abs=1e-15)

    @given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-4.0, 4.0), max_norm=st.floats(1e-3, 1e3),
           sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4))
    def test_clipped_norm_is_at_most_max_norm_and_direction_is_unchanged(seed, log_scale, max_norm, sizes):
        generator = torch.Generator().manual_seed(seed)
        params = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator, dtype=torch.float64) * 10.0**log_scale
        before = torch.cat([p.grad for p in params])
        norm = optim.clip_grad_norm(params, max_norm)
        after = torch.cat([p.grad for p in params])
        assert torch.linalg.vector_norm(after) <= max_norm * (1 + 1e-12)
        expected = before * min(1.0, max_norm / (norm.item() + 1e-6))  # same direction, length capped
        torch.testing.assert_close(after, expected, rtol=1e-12, atol=0)
        if norm <= max_norm:
            assert torch.equal(after, before)  # already short enough: untouched (scale exactly 1)


def test_warmup_linear_scheduler_steps_an_optimizer_along_the_closed_form():
    w, T = 3, 10
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 0.5}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2.0}])
    scheduler = optim.warmup_linear_scheduler(opt, w, T)
    # by hand: 1/3, 2/3, 1 during warm-up, then (10 - s)/7 down to 1/7 at step 9 and 0 at step 10
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0]
    for step, factor in enumerate(expected):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * factor, abs=1e-12), step
        assert opt.param_groups[1]["lr"] == pytest.approx(2.0 * factor, abs=1e-12), step
        opt.step()
        scheduler.step()


def test_warmup_linear_scheduler_rejects_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        optim.warmup_linear_scheduler("adam", 1, 5)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_linear_scheduler(opt, 0, 5)
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        optim.warmup_linear_scheduler(opt, 5, 5)
