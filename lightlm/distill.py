"""Knowledge distillation (知识蒸馏): the KD loss (chapter 6, "The KD loss"), intermediate-layer losses
(chapter 7, "Distilling a classifier"), top-k KD and forward/reverse KL for language models (chapter 8,
"Distilling a causal LM"). Chapter 7's Hugging Face ``Trainer`` is :mod:`lightlm.distill_trainer`'s.

Notation (see the glossary): ``z`` student logits, ``v`` teacher logits, temperature ``T``, ``p = softmax(v/T)``
the teacher's soft targets, ``q = softmax(z/T)`` the student's distribution. Logits have shape ``(..., C)``: every
leading dim counts as a batch dim, and "mean over the batch" means the mean over all rows. ``alpha`` always weights
the SOFT term (errata "Two conventions for α"): ``α_hard = 1 − α_soft``. ``T²`` is applied inside :func:`kd_loss`
and :func:`topk_kd_loss`, never in :func:`kl_divergence`. Every loss takes the STUDENT first and the teacher
second, as ``F.kl_div(input=student, target=teacher)``. Computation runs in float32 at least (float64 stays so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_callable, check_choice, check_int, check_real, check_tensor

__all__ = ["softmax_t", "kd_loss", "distillation_loss", "kl_divergence", "HiddenProjection", "hidden_state_loss",
           "attention_loss", "topk_teacher", "topk_kd_loss"]

# --------------------------------------------------------------------------- checks


def _check_logits(logits, name: str) -> None:
    check_tensor(name, logits, kind="float")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., classes) with at least one class, got {tuple(logits.shape)}")


def _check_pair(student, teacher) -> None:
    _check_logits(student, "student_logits")
    _check_logits(teacher, "teacher_logits")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"vocabulary mismatch: student_logits has {student.shape[-1]} classes, teacher_logits "
                         f"{teacher.shape[-1]}; distillation on logits needs one shared vocabulary")
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: student_logits {tuple(student.shape)} vs teacher_logits "
                         f"{tuple(teacher.shape)}; they must be equal")


def _check_temperature(T) -> None:
    check_real("temperature T", T, min=0, min_open=True)  # positive and finite


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p_i (log p_i − log q_i) elementwise, with 0 log 0 = 0 and no NaN in value or gradient where p_i = 0."""
    p = log_p.exp()
    support = p > 0  # outside it both logs may be −inf; replace them before they meet the product
    return p * (torch.where(support, log_p, 0.0) - torch.where(support, log_q, 0.0))


def _masked_mean(values: torch.Tensor, mask, name: str) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` (same shape) is nonzero; over all if None."""
    if mask is None:
        return values.mean()
    if check_tensor(name, mask).shape != values.shape:
        raise ValueError(f"{name} must have shape {tuple(values.shape)} (0/False = padding), got {tuple(mask.shape)}")
    keep = (mask != 0).to(values.device)
    if not keep.any():
        raise ValueError(f"{name} marks every position as padding: the mean over zero positions is undefined")
    return values[keep].mean()


# --------------------------------------------------------------------------- chapter 6: the KD loss


def softmax_t(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) over the last dim (chapter 6, eq. (softmax-t)): T > 1 flattens, T → 0 sharpens."""
    _check_logits(logits, "logits")
    _check_temperature(T)
    return F.softmax(logits / T, dim=-1)  # p_i = exp(v_i/T) / Σ_j exp(v_j/T)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """Soft-target loss of Hinton et al. (2015): ``T² · KL(p ‖ q)``, mean over rows (chapter 6, eq. (kd-loss)).

    Equal to ``T*T*F.kl_div(F.log_softmax(z/T, -1), F.softmax(v/T, -1), reduction="batchmean")`` for 2-D
    inputs; NOT ``reduction="mean"``, which also divides by the number of classes. The gradient is
    ``∂L/∂z = T (q − p) / N`` for N rows (eq. (kd-grad)); the factor T² keeps its size independent of T.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(T)
    classes = student_logits.shape[-1]
    z = _as_float(student_logits).reshape(-1, classes)  # (N, C): all leading dims are the batch
    v = _as_float(teacher_logits).reshape(-1, classes)
    log_q = F.log_softmax(z / T, dim=-1)  # log q_i = log softmax(z_i / T)
    log_p = F.log_softmax(v / T, dim=-1)  # log p_i = log softmax(v_i / T)
    kl = _kl_terms(log_p, log_q).sum(-1).mean()  # KL(p ‖ q) = Σ_i p_i log(p_i / q_i), mean over the N rows
    return T * T * kl  # T² keeps the gradient's size independent of T


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      T: float = 2.0, alpha: float = 0.5, ignore_index: int = -100) -> torch.Tensor:
    """``α · T² KL(p ‖ q) + (1 − α) · CE(y, softmax(z))`` (chapter 6, eq. (kd-loss); chapter 7, eq. (distill-loss)).

    α weights the SOFT term: α = 1 is pure distillation, α = 0 plain fine-tuning on the labels (where α
    weights the hard term, as in article 003, ``α_hard = 1 − α_soft``). The hard term is at temperature 1.
    Rows labelled ``ignore_index`` (padding, prompt tokens) are left out of BOTH terms: two means over N rows.
    Logits ``(..., C)``, equal shapes; ``labels``: integer class ids (or ignore_index), the logits' shape minus C.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(T)
    check_real("alpha (the weight of the soft term)", alpha, min=0, max=1)
    check_tensor("labels", labels, kind="int")
    check_int("ignore_index", ignore_index)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits without their "
                         f"class dim), got {tuple(labels.shape)}")
    keep = labels != ignore_index  # rows that carry a label
    if not keep.any():
        raise ValueError(f"every label is ignore_index={ignore_index}: the mean over zero rows is undefined")
    classes = student_logits.shape[-1]
    y = labels[keep]  # (N,)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must be class ids in [0, {classes}) or ignore_index={ignore_index}, "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    z, v = student_logits[keep], teacher_logits[keep]  # (N, C) each
    soft = kd_loss(z, v, T)  # T² KL(softmax(v/T) ‖ softmax(z/T))
    hard = F.cross_entropy(_as_float(z), y)  # CE(y, softmax(z)), temperature 1
    return alpha * soft + (1 - alpha) * hard  # α weights the soft term


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "forward",
                  T: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """KL divergence between the teacher's ``p = softmax(teacher_logits/T)`` and the student's ``q =
    softmax(student_logits/T)`` (chapter 8, eq. (kl-directions)). Student first, teacher second, like every loss
    here and ``F.kl_div(input=student, target=teacher)``. No T²: ``kd_loss(z, v, T) = T² · kl_divergence(z, v, T=T)``.

    ``"forward"``: KL(p ‖ q) = Σ p log(p/q), mode covering: q is penalised wherever p has mass and q does not,
    so a unimodal q spreads over all of p's modes. ``"reverse"``: KL(q ‖ p) = Σ q log(q/p), mode seeking: q is
    penalised wherever it puts mass that p lacks, so it settles on one mode (as in MiniLLM, Gu et al. 2024).
    ``reduction``: ``"mean"`` over rows or ``"none"`` (one value per row).
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(T)
    check_choice("direction", direction, ("forward", "reverse"))  # KL(p ‖ q) or KL(q ‖ p), p the teacher
    check_choice("reduction", reduction, ("mean", "none"))
    log_p = F.log_softmax(_as_float(teacher_logits) / T, dim=-1)  # teacher
    log_q = F.log_softmax(_as_float(student_logits) / T, dim=-1)  # student
    if direction == "forward":
        kl = _kl_terms(log_p, log_q).sum(-1)  # KL(p ‖ q) = Σ_i p_i log(p_i / q_i)
    else:
        kl = _kl_terms(log_q, log_p).sum(-1)  # KL(q ‖ p) = Σ_i q_i log(q_i / p_i)
    return kl.mean() if reduction == "mean" else kl


# --------------------------------------------------------------------------- chapter 7: intermediate layers


class HiddenProjection(nn.Linear):
    """Learned map ``W_h`` from the student's hidden width to the teacher's (TinyBERT, Jiao et al. 2020)."""

    def __init__(self, d_student: int, d_teacher: int, bias: bool = True):
        check_int("d_student", d_student, min=1)
        check_int("d_teacher", d_teacher, min=1)
        super().__init__(d_student, d_teacher, bias=bias)


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection=None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``MSE(H_S W_h, H_T)`` averaged over real tokens (TinyBERT; chapter 7, eq. (hidden-loss)).

    Per token the squared error is averaged over the teacher's d hidden units, then over the tokens where
    ``attention_mask`` (shape ``(..., seq)``) is nonzero; with no mask this is ``F.mse_loss``. Shapes:
    ``student_hidden`` ``(..., seq, d_student)``, ``teacher_hidden`` ``(..., seq, d_teacher)``. ``projection``:
    any module or callable mapping d_student to d_teacher (:class:`HiddenProjection`); needed if widths differ.
    """
    _check_logits(student_hidden, "student_hidden")
    _check_logits(teacher_hidden, "teacher_hidden")
    if student_hidden.ndim < 2 or student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must be (..., seq, d) with the same leading dims")
    d_student, d_teacher = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if projection is None:
        if d_student != d_teacher:
            raise ValueError(f"hidden widths differ (student {d_student}, teacher {d_teacher}) and no projection "
                             f"was given; pass projection=HiddenProjection({d_student}, {d_teacher})")
        projected = student_hidden
    else:
        check_callable("projection", projection)
        projected = projection(student_hidden)  # H_S W_h: (..., seq, d_teacher)
        if not isinstance(projected, torch.Tensor) or projected.shape != teacher_hidden.shape:
            raise ValueError(f"projection must map the student's states to the teacher's shape "
                             f"{tuple(teacher_hidden.shape)}, got {getattr(projected, 'shape', type(projected))}")
    squared = (_as_float(projected) - _as_float(teacher_hidden)).pow(2).mean(-1)  # ‖H_S W_h − H_T‖²/d per token
    return _masked_mean(squared, attention_mask, "attention_mask")


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention distribution transfer, MiniLM's L_AT (Wang et al. 2020; chapter 7, eq. (attn-loss)):
    ``(1 / (h·L)) Σ_heads Σ_queries KL(A_T ‖ A_S)``, each KL over the keys of one query row.

    Inputs are attention weights (rows sum to 1, as ``output_attentions=True`` returns them), shape ``(batch, heads,
    L, S)``, equal for teacher and student. Padded keys carry teacher weight 0, and 0·log 0 = 0: they add nothing and
    give no NaN. ``attention_mask`` ``(batch, L)`` drops padded query rows. Head counts must be equal, as in MiniLM;
    a teacher with more heads: average groups of them first, ``teacher_attn.unflatten(1, (h_s, -1)).mean(2)`` (an
    average of distributions is a distribution), or pick h_s.
    """
    _check_logits(student_attn, "student_attn")
    _check_logits(teacher_attn, "teacher_attn")
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise ValueError(f"attention weights must be (batch, heads, L, S), got student {tuple(student_attn.shape)}"
                         f" and teacher {tuple(teacher_attn.shape)}")
    if student_attn.shape[1] != teacher_attn.shape[1]:
        h_s, h_t = student_attn.shape[1], teacher_attn.shape[1]
        raise ValueError(f"teacher has {h_t} heads, student {h_s}: they must be equal; average groups of teacher "
                         f"heads (teacher_attn.unflatten(1, ({h_s}, -1)).mean(2)) or pick {h_s} of them")
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"student_attn {tuple(student_attn.shape)} and teacher_attn {tuple(teacher_attn.shape)} "
                         "must have the same batch and sequence lengths")
    a_s, a_t = _as_float(student_attn), _as_float(teacher_attn)
    positive = a_t > 0  # padded keys carry teacher weight 0, and 0 · log 0 = 0 (logs of 1 there: no NaN)
    log_ratio = torch.where(positive, a_t, 1.0).log() - torch.where(positive, a_s, 1.0).log()
    kl = (a_t * log_ratio).sum(-1)  # KL(A_T ‖ A_S) = Σ_keys a_T log(a_T / a_S) per head and query: (b, h, L)
    # the mean over heads, then over the (batch, L) query rows the mask keeps: every head has the same rows
    return _masked_mean(kl.mean(1), attention_mask, "attention_mask")


# --------------------------------------------------------------------------- chapter 8: top-k KD for LMs


def topk_teacher(teacher_logits: torch.Tensor, k: int, T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens per position, for caching (chapter 8, eq. (topk-cache)).

    Returns ``(values, indices)``, each ``(..., k)``, largest first. ``values`` are the teacher's LOG-PROBABILITIES
    at temperature T, ``log p_i = v_i/T − logsumexp(v/T)``, so that ``1 − Σ exp(values)`` is the exact mass of the
    other V − k tokens and no third tensor needs storing. Pass the same T to :func:`topk_kd_loss`. Stores k values
    and ids per position instead of V logits (e.g. ``values.half()``, ``indices.int()``).
    """
    _check_logits(teacher_logits, "teacher_logits")
    _check_temperature(T)
    check_int("k (at most the vocabulary size)", k, min=1, max=teacher_logits.shape[-1])
    with torch.no_grad():  # a target, never trained
        log_p = F.log_softmax(_as_float(teacher_logits) / T, dim=-1)  # log p_i = v_i/T − log Σ_j exp(v_j/T)
        return log_p.topk(k, dim=-1)


def topk_kd_loss(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                 T: float = 1.0, tail: str = "renormalise", mask: torch.Tensor | None = None) -> torch.Tensor:
    """KD from a cached top-k teacher, ``T² ·`` a KL per position, mean over positions where ``mask`` is
    nonzero (chapter 8, eqs. (topk-renorm), (topk-bucket)). With k = V both tails equal :func:`kd_loss`.

    The student's ``log q_i`` always come from its FULL softmax at temperature T, read at the teacher's k tokens K;
    the teacher's come from :func:`topk_teacher` (made with the same T).

    * ``"renormalise"``: the teacher is renormalised over K, ``p̃_i = p_i / Σ_{j∈K} p_j``, and the loss is
      ``KL(p̃ ‖ q) = Σ_{i∈K} p̃_i log(p̃_i / q_i) = CE(p̃, q) − H(p̃)``, an exact KL in which p̃ is zero off K:
      it pushes the student's mass off K towards zero.
    * ``"bucket"``: the V − k other tokens become one outcome, teacher mass ``P = 1 − Σ_{i∈K} p_i``, student
      mass ``Q = Σ_{j∉K} q_j``: ``Σ_{i∈K} p_i log(p_i / q_i) + P log(P / Q)``, the exact KL over k + 1
      outcomes, between 0 and the full KL (merging outcomes never raises a KL).
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(topk_values, "topk_values")
    _check_temperature(T)
    check_choice("tail", tail, ("renormalise", "bucket"))
    check_tensor("topk_indices", topk_indices, kind="int")  # integer token ids
    vocab, k = student_logits.shape[-1], topk_values.shape[-1]
    if k > vocab:
        raise ValueError(f"k = {k} cached teacher tokens exceed the student's vocabulary of {vocab}")
    if topk_indices.shape != topk_values.shape or topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"topk_values {tuple(topk_values.shape)} and topk_indices {tuple(topk_indices.shape)} must"
                         f" be (..., k) with the student's leading dims {tuple(student_logits.shape[:-1])}")
    if topk_indices.numel() == 0:
        raise ValueError(f"topk_indices {tuple(topk_indices.shape)} holds no token: nothing to distil")
    if topk_indices.min() < 0 or topk_indices.max() >= vocab:
        raise ValueError(f"topk_indices must be token ids in [0, {vocab}) (the student's vocabulary), got "
                         f"values in [{int(topk_indices.min())}, {int(topk_indices.max())}]")
    indices = topk_indices.long()
    log_q = F.log_softmax(_as_float(student_logits) / T, dim=-1)  # student's full softmax: (..., V)
    log_q_k = log_q.gather(-1, indices)  # log q_i, i ∈ K: (..., k)
    log_p_k = _as_float(topk_values).to(log_q.dtype)  # log p_i, i ∈ K, cached at temperature T
    if tail == "renormalise":
        log_p_k = log_p_k.log_softmax(-1)  # log p̃_i = log p_i − log Σ_{j∈K} p_j
    kl = _kl_terms(log_p_k, log_q_k).sum(-1)  # Σ_{i∈K} p_i log(p_i / q_i)
    if tail == "bucket" and k < vocab:
        log_p_tail = (-torch.expm1(log_p_k.logsumexp(-1))).clamp_min(0).log()  # log P = log(1 − Σ_{i∈K} p_i)
        log_q_tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1)  # log Q = log Σ_{j∉K} q_j
        kl = kl + _kl_terms(log_p_tail, log_q_tail)  # + P log(P / Q)
    return T * T * _masked_mean(kl, mask, "mask")


def __getattr__(name: str):
    """``distill.DistillationTrainer``, found in :mod:`lightlm.distill_trainer` (which imports transformers)."""
    if name == "DistillationTrainer":
        from .distill_trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
