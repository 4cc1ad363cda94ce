"""On-policy distillation (在线策略蒸馏) of a causal LM (chapter 8, "Distilling a causal LM", eq. (onpolicy)).

Off-policy distillation (chapter 8's token-level KD) matches the teacher along prefixes someone else wrote: the
data, or the teacher's own text. At generation time the student reads prefixes IT wrote, errors included, which
it never trained on: exposure bias (暴露偏差). On-policy distillation trains on the student's own samples
(Agarwal et al. 2024, GKD): the student samples continuations of prompts (:func:`sample`), the teacher scores
every sampled prefix, and the student minimises a token-level divergence to the teacher at those positions
(:func:`token_divergence`, :func:`onpolicy_loss`). MiniLLM (Gu et al. 2024) also trains on student samples, but
minimises the SEQUENCE-level reverse KL with a policy gradient; the token-level reverse KL on student samples
here is GKD's form of it.

Notation as in :mod:`lightlm.distill`: ``p`` the teacher's next-token distribution, ``q`` the student's, logits
``(..., V)`` with every leading dim a batch dim. Models are callables ``ids -> logits`` (or an object with a
``.logits`` field, as Hugging Face models return). Pure torch; works on whatever device the tensors are on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_real, check_tensor
from .distill import topk_teacher

__all__ = ["sample", "bucket_log_probs", "token_divergence", "onpolicy_loss"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` as a tensor: a plain tensor, or the ``.logits`` of a Hugging Face output."""
    out = model(ids)
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[:2] != ids.shape:
        raise ValueError(f"a model must map ids {tuple(ids.shape)} to logits (batch, seq, vocab), "
                         f"got {getattr(out, 'shape', type(out).__name__)}")
    return out


def _check_prompts(prompts) -> None:
    check_tensor("prompts", prompts, kind="int", ndim=2)
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be (batch, prompt_len) with at least one token each, "
                         f"got {tuple(prompts.shape)}")


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each prompt by ``new_tokens`` tokens drawn from the model: ``y_t ~ softmax(z_t / temperature)``
    with ``torch.multinomial`` (``generator`` fixes the draws), or the arg-max at ``temperature == 0``.

    ``prompts``: (batch, prompt_len) integer ids. Returns (batch, prompt_len + new_tokens). No gradient; the
    model's train/eval mode is restored. The model sees the whole sequence (no cropping to a context length).
    """
    _check_prompts(prompts)
    check_int("new_tokens", new_tokens, min=1)
    temperature = check_real("temperature", temperature, min=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ids = prompts
    for _ in range(new_tokens):
        logits = _logits(model, ids)[:, -1]  # (batch, V): the next-token logits z_t
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            next_id = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
    if hasattr(model, "train"):
        model.train(was_training)
    return ids


def bucket_log_probs(log_probs_k: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """(..., k) log-probabilities on a set K of tokens -> (..., k + 1): the last outcome is the rest of the
    vocabulary, ``log(1 − Σ_{i∈K} p_i)`` (chapter 8, eq. (topk-bucket)). Any distribution coarsened this way.

    The tail mass is floored at ``floor`` (then the k + 1 values are renormalised), so that rounding in stored
    values (fp16 keeps about 3 significant digits) cannot make it zero or negative: a reverse KL over the k + 1
    outcomes stays finite. With the floor inactive the forward KL between two bucketed distributions is
    :func:`lightlm.distill.topk_kd_loss` with ``tail="bucket"``.
    """
    check_tensor("log_probs_k", log_probs_k, kind="float", min_ndim=1)
    floor = check_real("floor (the smallest tail mass)", floor, min=0, max=1, min_open=True, max_open=True)
    if log_probs_k.shape[-1] < 1:
        raise ValueError(f"log_probs_k must hold at least one token per position, got {tuple(log_probs_k.shape)}")
    log_probs_k = log_probs_k if log_probs_k.dtype == torch.float64 else log_probs_k.float()
    tail = (-torch.expm1(log_probs_k.logsumexp(-1))).clamp_min(floor)  # P = 1 − Σ_{i∈K} p_i, at least floor
    return torch.cat([log_probs_k, tail.log()[..., None]], dim=-1).log_softmax(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward",
                     beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of a divergence between the teacher's ``p = softmax(v)`` and the student's
    ``q = softmax(z)`` (chapter 8, eq. (gkd-jsd)); logits ``(..., V)`` of equal shapes (or (..., k+1) bucketed
    log-probabilities from :func:`bucket_log_probs`). ``mask`` (the logits' shape without V): positions to keep.

    * ``"forward"``: KL(p ‖ q) = Σ p log(p / q);  ``"reverse"``: KL(q ‖ p) = Σ q log(q / p);
    * ``"jsd"``: GKD's generalized Jensen–Shannon divergence, with ``m = β p + (1 − β) q``,
      ``JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, 0 < β < 1; at β = 0.5 the usual JSD, at most log 2.
    """
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_tensor(name, logits, kind="float", min_ndim=1)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (one shared vocabulary)")
    check_choice("divergence", divergence, ("forward", "reverse", "jsd"))
    beta = check_real("beta (the teacher's weight in the JSD mixture)", beta, min=0, max=1, min_open=True,
                      max_open=True)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)  # student
    log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1)  # teacher
    if divergence == "forward":
        per_position = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p ‖ q)
    elif divergence == "reverse":
        per_position = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q ‖ p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # log(β p + (1 − β) q)
        per_position = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)  # β KL(p ‖ m)
                        + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
    if mask is None:
        return per_position.mean()
    if check_tensor("mask", mask).shape != per_position.shape:
        raise ValueError(f"mask must have shape {tuple(per_position.shape)} (the logits without their last dim), "
                         f"got {tuple(mask.shape)}")
    keep = mask.to(per_position.device) != 0
    if not keep.any():
        raise ValueError("mask keeps no position: the mean over zero positions is undefined")
    return per_position[keep].mean()


def onpolicy_loss(student, teacher, prompts: torch.Tensor, new_tokens: int, divergence: str = "forward",
                  beta: float = 0.5, k: int | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One on-policy distillation loss (GKD, Agarwal et al. 2024; chapter 8, eq. (onpolicy)): the student
    samples ``new_tokens`` after each prompt (:func:`sample`, no gradient), the teacher scores the sampled
    sequences (no gradient), and the student's :func:`token_divergence` to the teacher is averaged over the
    ``new_tokens`` positions that predict a sampled token. Gradients reach only the student's logits.

    ``k``: None compares the full V-way distributions; an int keeps the teacher's top k tokens at each position
    plus a tail bucket for both models (:func:`bucket_log_probs`), as a top-k cache would. Returns a scalar.
    """
    _check_prompts(prompts)
    check_int("new_tokens", new_tokens, min=1)
    if k is not None:
        check_int("k (teacher tokens kept per position)", k, min=1)
    ids = sample(student, prompts, new_tokens, temperature, generator)  # y ~ q(· | x): the student's own text
    scored = slice(prompts.shape[1] - 1, ids.shape[1] - 1)  # positions whose next token was sampled
    with torch.no_grad():
        teacher_logits = _logits(teacher, ids)[:, scored]  # p(· | x, y_<t) on the student's prefixes
    student_logits = _logits(student, ids)[:, scored]  # q(· | x, y_<t), with gradient
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(f"teacher ({teacher_logits.shape[-1]} tokens) and student ({student_logits.shape[-1]}) "
                         "must share one vocabulary")
    if k is not None:
        top_values, top_indices = topk_teacher(teacher_logits, k)  # raises if k > V
        log_q_k = F.log_softmax(student_logits.float(), dim=-1).gather(-1, top_indices)
        student_logits, teacher_logits = bucket_log_probs(log_q_k), bucket_log_probs(top_values)
    return token_divergence(student_logits, teacher_logits, divergence, beta)
