"""A Hugging Face ``Trainer`` that distils (chapter 7, "Distilling a classifier", eq. (distill-loss)).

Kept apart from :mod:`lightlm.distill` so that the losses stay pure torch. ``transformers`` is imported only
when ``DistillationTrainer`` is first used: the class is built then, and cached in this module (so it pickles
as ``lightlm.distill_trainer.DistillationTrainer``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_bool, check_module, check_real
from .distill import distillation_loss

__all__ = ["DistillationTrainer"]


def _make_distillation_trainer() -> type:
    from transformers import Trainer  # imported here: `import lightlm.distill_trainer` stays light

    class DistillationTrainer(Trainer):
        """A ``transformers.Trainer`` whose loss is :func:`lightlm.distill.distillation_loss` (chapter 7,
        eq. (distill-loss)).

        ``DistillationTrainer(model=student, args=..., train_dataset=..., teacher_model=teacher,
        temperature=2.0, alpha=0.5)``. The teacher is frozen (``requires_grad=False``, eval mode), moved to
        the training device and run under ``torch.no_grad()`` on the same inputs as the student, so teacher
        and student must share the tokenizer. Batches must hold ``labels`` (-100 = no loss, as Hugging Face's
        collators make them). ``causal_lm=True`` pairs the logits at position t with the label at t + 1.
        Being a Trainer, the same script runs on many GPUs with ``accelerate launch`` or ``torchrun``.
        """

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by GA steps

        def __init__(self, *args, teacher_model: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                     causal_lm: bool = False, **kwargs):
            check_module("teacher_model", teacher_model)
            check_real("temperature", temperature, min=0, min_open=True)
            check_real("alpha (the weight of the soft term)", alpha, min=0, max=1)
            check_bool("causal_lm", causal_lm)
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # no num_items_in_batch: the loss is this batch's mean
            self.teacher_model = teacher_model.requires_grad_(False).eval().to(self.args.device)
            self.temperature, self.alpha, self.causal_lm = temperature, alpha, causal_lm

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            if "labels" not in inputs:
                raise ValueError("DistillationTrainer needs 'labels' in every batch (-100 where there is no loss)")
            labels = inputs.pop("labels")  # the student must not compute its own loss
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**inputs).logits
            student_logits = outputs.logits
            if self.causal_lm:  # the logits at position t predict token t + 1
                student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
            loss = distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)
            return (loss, outputs) if return_outputs else loss

    DistillationTrainer.__module__ = __name__
    DistillationTrainer.__qualname__ = "DistillationTrainer"  # pickle finds it here, as a module attribute
    return DistillationTrainer


def __getattr__(name: str):
    """Build ``DistillationTrainer`` (and import transformers) on first access only."""
    if name == "DistillationTrainer":
        globals()[name] = trainer_class = _make_distillation_trainer()
        return trainer_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
