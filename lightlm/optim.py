"""Adam and AdamW written out, a warm-up + cosine learning-rate schedule and gradient clipping by global norm
(chapter 5, "Optimizers").

Both are ``torch.optim.Optimizer`` subclasses with ``torch.optim``'s constructor signature, so they drop into
any training loop, accept parameter groups and save/load with ``state_dict()``. The per-element arithmetic
follows ``torch.optim.Adam``'s single-tensor path operation for operation (``lerp_`` for the first moment,
``addcmul_`` for the second, one ``addcdiv_`` for the update), so on CPU the parameters they leave agree with
torch's to the last bit, and the state they keep (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``)
loads into torch's optimizers and back.

For one parameter θ with gradient g_t at step t = 1, 2, ... (Kingma & Ba 2015):

    m_t = β1·m_{t-1} + (1 − β1)·g_t            v_t = β2·v_{t-1} + (1 − β2)·g_t²       eq. (adam-moments)
    m̂_t = m_t / (1 − β1^t)                      v̂_t = v_t / (1 − β2^t)               eq. (adam-bias)
    θ_t = θ_{t-1} − lr · m̂_t / (√v̂_t + ε)                                            eq. (adam-update)

Weight decay λ enters the two optimizers differently (Loshchilov & Hutter 2019), eqs. (adam-l2) and (adamw):
``Adam`` adds an L2 term to the gradient, g_t ← g_t + λ·θ_{t-1}, which then passes through m and v and is
divided by √v̂ like the rest of the gradient; ``AdamW`` decays the weights directly, θ ← θ − lr·λ·θ, before the
Adam step, so every weight shrinks by the same factor (1 − lr·λ) whatever its gradient history.

The update that a source article calls "AdamP" (Adam with "Pavlov's" momentum) is a Nesterov-style Adam, close
to NAdam (Dozat 2016, ``torch.optim.NAdam``), not AdamP (Heo et al. 2021); see the errata.

:func:`warmup_cosine` is the learning rate at a step, linear warm-up then cosine decay (eq. (warmup-cosine)), and
:func:`warmup_cosine_scheduler` the same as a ``torch.optim.lr_scheduler.LambdaLR``, equal to transformers'
``get_cosine_schedule_with_warmup``. :func:`clip_grad_norm` rescales all gradients together so that their global
L2 norm is at most ``max_norm`` (eq. (grad-clip)), as ``torch.nn.utils.clip_grad_norm_`` does.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import math

import torch

from ._checks import check_bool, check_int, check_real

__all__ = ["Adam", "AdamW", "warmup_cosine", "warmup_cosine_scheduler", "warmup_linear_scheduler", "clip_grad_norm"]


def _check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: Any) -> None:
    """Raise a ValueError/TypeError that names the argument, what it was and what is allowed."""
    check_real("lr", lr, min=0)
    check_real("eps", eps, min=0, min_open=True)  # ε > 0 keeps m̂ / (√v̂ + ε) finite when v̂ = 0
    check_real("weight_decay", weight_decay, min=0)
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {type(betas).__name__}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values")
    for index, beta in enumerate(betas):
        check_real(f"betas[{index}]", beta, min=0, max=1, max_open=True)
    check_bool("amsgrad", amsgrad)


class Adam(torch.optim.Optimizer):
    """Adam with L2 weight decay (chapter 5, eqs. (adam-moments), (adam-bias), (adam-update), (adam-l2)); same
    signature and results as ``torch.optim.Adam``.

    Args:
        params: an iterable of tensors, or of dicts defining parameter groups (each may override any of the
            options below, e.g. ``[{"params": body, "lr": 1e-4}, {"params": head}]``).
        lr: learning rate, >= 0.
        betas: (β1, β2), each in [0, 1): decay rates of the first and second moment averages.
        eps: ε > 0, added to √v̂ in the denominator.
        weight_decay: λ >= 0; ``Adam`` adds λ·θ to the gradient (L2), ``AdamW`` decays θ by lr·λ·θ.
        amsgrad: divide by the running maximum of v̂ instead of v̂ (Reddi et al. 2018).
    """

    decoupled_weight_decay = False  # Adam: L2 added to g; AdamW overrides this

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, amsgrad)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (filled in from the defaults) after checking its options like the constructor's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients; "
                                    "use torch.optim.SparseAdam")
                self._update(param, param.grad, self.state[param], lr, beta1, beta2, eps, weight_decay, amsgrad)
        return loss

    def _update(self, param, grad, state, lr, beta1, beta2, eps, weight_decay, amsgrad) -> None:
        if not state:  # lazy initialisation, with torch's names, so state_dicts are interchangeable
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # a tensor, as torch.optim keeps it
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)  # m_0 = 0
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)  # v_0 = 0
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()  # t

        if weight_decay != 0:
            if self.decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)  # θ ← θ − lr·λ·θ   (AdamW: decoupled, never divided by √v̂)
            else:
                grad = grad.add(param, alpha=weight_decay)  # g ← g + λ·θ   (Adam: L2 term joins the gradient)

        # a complex number is updated as two real ones, as torch.optim does
        param, grad, exp_avg, exp_avg_sq = map(_as_real, (param, grad, state["exp_avg"], state["exp_avg_sq"]))

        exp_avg.lerp_(grad, 1 - beta1)  # m_t = β1·m_{t-1} + (1 − β1)·g_t   (as m + (1 − β1)·(g − m))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t = β2·v_{t-1} + (1 − β2)·g_t²

        bias_correction1 = 1 - beta1**step  # 1 − β1^t   (m̂_t = m_t / (1 − β1^t))
        bias_correction2 = 1 - beta2**step  # 1 − β2^t   (v̂_t = v_t / (1 − β2^t))
        step_size = lr / bias_correction1  # lr / (1 − β1^t): m̂'s correction folded into the step size
        if amsgrad:
            max_exp_avg_sq = _as_real(state["max_exp_avg_sq"])
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)  # v_max = max(v_max, v_t)
            exp_avg_sq = max_exp_avg_sq  # AMSGrad divides by the running maximum
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)  # √v̂_t + ε = √v_t / √(1 − β2^t) + ε
        param.addcdiv_(exp_avg, denom, value=-step_size)  # θ_t = θ_{t-1} − lr · m̂_t / (√v̂_t + ε)


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    """A real view of a complex tensor (..., 2); a real tensor unchanged."""
    return torch.view_as_real(tensor) if torch.is_complex(tensor) else tensor


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (chapter 5, eq. (adamw)); same results as ``torch.optim.AdamW``.

    Before each Adam step every weight shrinks, θ ← θ − lr·λ·θ; the decay never enters m or v and is not divided
    by √v̂. The default ``weight_decay`` is 1e-2, as in ``torch.optim.AdamW``. Arguments as for :class:`Adam`.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _check_schedule(warmup_steps: Any, total_steps: Any) -> None:
    check_int("total_steps", total_steps, min=1)
    check_int("warmup_steps", warmup_steps, min=0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be < total_steps ({total_steps}), got {warmup_steps}: "
                         "the cosine decay needs at least one step")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (0, 1, ...): linear warm-up, then cosine decay (chapter 5, eq. (warmup-cosine)).

    ``peak_lr · step / warmup_steps`` while ``step < warmup_steps``; then, with the progress
    ``s = (step − warmup_steps) / (total_steps − warmup_steps)`` in [0, 1],
    ``min_lr + (peak_lr − min_lr) · ½ (1 + cos(π s))``, from ``peak_lr`` down to ``min_lr`` at ``total_steps``.
    After ``total_steps`` it stays at ``min_lr`` (transformers' schedule would rise again).
    Equal to transformers' ``get_cosine_schedule_with_warmup`` times ``peak_lr`` when ``min_lr = 0``.

    Args:
        step: the optimizer steps taken so far, an int >= 0.
        warmup_steps: an int in [0, total_steps); 0 starts at ``peak_lr``.
        total_steps: an int >= 1, where the decay reaches ``min_lr``.
        peak_lr: the largest learning rate, >= 0; min_lr: the final one, in [0, peak_lr].
    """
    check_int("step", step, min=0)
    _check_schedule(warmup_steps, total_steps)
    peak_lr = check_real("peak_lr", peak_lr, min=0)
    min_lr = check_real("min_lr", min_lr, min=0, max=peak_lr)
    if step < warmup_steps:
        return peak_lr * step / warmup_steps  # η_t = η_max · t / t_w   (warm-up)
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))  # s = (t − t_w) / (t_max − t_w)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))  # eq. (warmup-cosine)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that follows :func:`warmup_cosine` with each parameter group's initial ``lr`` as its peak.

    Call ``scheduler.step()`` after each ``optimizer.step()``; before the first one the groups' lr is that of step
    0 (0 when ``warmup_steps > 0``). ``min_lr_ratio`` in [0, 1] is the final lr as a fraction of the peak (the
    ``min_lr_rate`` of transformers' ``get_cosine_with_min_lr_schedule_with_warmup``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_schedule(warmup_steps, total_steps)
    min_lr_ratio = check_real("min_lr_ratio", min_lr_ratio, min=0, max=1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, 1.0, min_lr_ratio))


def warmup_linear_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with linear warm-up, then linear decay to zero: the lr at step s (0, 1, ...) is the group's
    initial lr times min((s + 1)/w, (T − s)/(T − w)), w = ``warmup_steps`` >= 1, T = ``total_steps`` > w. The
    first step already trains (at lr/w); the peak is reached at step w − 1 and 0 at step T. The schedule of the
    book's fine-tuning runs (chapters 7, 12, 13)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_schedule(warmup_steps, total_steps)
    check_int("warmup_steps", warmup_steps, min=1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup_steps, (total_steps - step) / (total_steps - warmup_steps)))


def clip_grad_norm(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (‖g‖ + 1e-6))``, in place (chapter 5, eq. (grad-clip)).

    ``‖g‖`` is the global L2 norm, over all the gradients together as one vector. The direction of the whole
    gradient is unchanged; only its length is capped. Returns ``‖g‖`` before clipping, as
    ``torch.nn.utils.clip_grad_norm_`` (norm_type 2), whose results it matches. Parameters without a
    gradient are skipped; with none at all the norm is 0. ``max_norm=math.inf`` only measures the norm.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    try:
        parameters = list(parameters)
    except TypeError:
        raise TypeError(f"parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}")
    for index, param in enumerate(parameters):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"parameters[{index}] must be a torch.Tensor, got {type(param).__name__}")
    max_norm = check_real("max_norm", max_norm, min=0, min_open=True, finite=False)  # inf: measure, never clip
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads])  # ‖g_i‖ of each tensor
    total_norm = torch.linalg.vector_norm(norms)  # ‖g‖ = √(Σ_i ‖g_i‖²), one norm over all gradients
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)  # min(1, c / ‖g‖)
    for grad in grads:
        grad.mul_(scale.to(grad.device))  # g ← g · min(1, c / ‖g‖)   eq. (grad-clip)
    return total_norm
