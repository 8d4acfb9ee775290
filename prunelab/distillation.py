"""Knowledge distillation for recovery: the pruned model learns the unpruned model's outputs.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). With student
logits ``z_s``, teacher logits ``z_t`` and a temperature ``T``, each counted position contributes

    KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c),   p = softmax(z / T),

and the training loss of :func:`prunelab.fit` with ``distill_from=teacher`` is

    (1 − w) · task loss + w · T² · mean over counted positions of KL(p_t ‖ p_s).

The factor ``T²`` keeps the gradient of the soft term on the scale of the task loss's as ``T``
changes (the soft targets' gradients shrink as ``1/T²``).

**Which positions count.** Exactly those the task loss counts: for class logits ``(N, C)``
every example whose label is not ``ignore_index`` (-100); for token logits ``(N, T, V)`` the
positions that predict a target — with next-token targets (no targets, or Hugging Face
``labels``) position ``t`` predicts token ``t+1``, so the last position does not count — and
never a position whose target is -100. Padding is therefore left out the same way as for the task
loss: by labels of -100 (an ``attention_mask`` alone does not remove positions from either term).
With a user's ``loss_fn`` whose targets are not classes or tokens of the logits, every position
counts. The mean is over the counted positions of the batch (a batch with none adds 0).

The teacher runs on the same batch, in eval mode (its own train/eval flags are restored after
``fit``) and without autograd; it is never changed. A weight of 0 is plain training: the teacher
is not even run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from prunelab._validation import check_number, check_type
from prunelab.inputs import IGNORE_INDEX, Batch, Loss, loss_targets

DEFAULT_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 2.0


def kl_term(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``T² ·`` the mean over the rows of ``keep`` (all rows if None) of ``KL(p_t ‖ p_s)``,
    for logits ``student``/``teacher`` of shape ``(M, C)``; 0 when no row is kept."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher.to(student.dtype) / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
    if keep is not None:
        per_row = per_row[keep]
    if per_row.numel() == 0:
        return student.sum() * 0.0  # keeps the graph; adds nothing
    return per_row.mean() * temperature**2


def counted_rows(
    logits: torch.Tensor, batch: Batch, loss: Loss, trusted: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` as rows ``(M, C)`` aligned with the task loss's targets, and which rows count
    (None: all), as the module docstring says."""
    if trusted and logits.dim() == 2:  # in-memory class labels, none ignored
        return logits, None
    try:
        flat, targets = loss_targets(logits, batch, where=loss.where)
    except ValueError:
        if loss.is_cross_entropy:
            raise
        return logits.reshape(-1, logits.shape[-1]), None  # a user's loss on other targets
    return flat, targets != IGNORE_INDEX


@dataclass(frozen=True)
class Distillation:
    """A teacher and how much its soft targets weigh (``weight`` w, ``temperature`` T)."""

    teacher: nn.Module
    weight: float
    temperature: float

    def teacher_logits(self, loss: Loss, batch: Batch) -> torch.Tensor:
        """The teacher's logits on ``batch`` (no autograd; the caller puts it in eval mode)."""
        with torch.no_grad():
            return loss.logits(batch.call(self.teacher))

    def term(self, loss: Loss, output, batch: Batch, trusted: bool = False) -> torch.Tensor:
        """``T² · mean KL(p_t ‖ p_s)`` over the counted positions of ``batch``."""
        student, keep = counted_rows(loss.logits(output), batch, loss, trusted)
        teacher, _ = counted_rows(self.teacher_logits(loss, batch), batch, loss, trusted)
        return kl_term(student, teacher, self.temperature, keep)

    def combine(self, task: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """``(1 − w) · task + w · soft`` (the soft term alone at w = 1)."""
        if self.weight == 1.0:
            return soft
        return (1.0 - self.weight) * task + self.weight * soft


def make_distillation(model: nn.Module, teacher, weight, temperature, *, where: str = "fit") -> Distillation | None:
    """Validate ``distill_from``/``distill_weight``/``temperature`` (None: the defaults 0.5 and 2.0);
    None when there is no teacher (then neither of the other two may be given)."""
    if teacher is None:
        for param, value in (("distill_weight", weight), ("temperature", temperature)):
            if value is not None:
                raise ValueError(
                    f"the '{param}' parameter of {where} applies only with distill_from= (the teacher "
                    f"model). Got {param}={value!r} without a teacher; pass distill_from= or leave "
                    f"{param} out."
                )
        return None
    check_type("distill_from", teacher, nn.Module, where=where, expected="an nn.Module (the teacher model)")
    if teacher is model:
        raise ValueError(
            f"the 'distill_from' parameter of {where} is the model being trained; pass a copy of "
            f"the unpruned model (copy.deepcopy(model) before pruning) as the teacher."
        )
    shared = {id(p) for p in model.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(
            f"the 'distill_from' parameter of {where} shares {len(shared)} parameter tensor(s) with "
            f"the model being trained, so the teacher would change with it; pass a copy "
            f"(copy.deepcopy(model) before pruning)."
        )
    weight = check_number(
        "distill_weight", DEFAULT_WEIGHT if weight is None else weight, where=where, low=0.0, high=1.0
    )
    temperature = check_number(
        "temperature",
        DEFAULT_TEMPERATURE if temperature is None else temperature,
        where=where,
        low=0.0,
        closed="neither",
    )
    return Distillation(teacher, weight, temperature)


def check_teacher(distill: Distillation, student_output, batch: Batch, loss: Loss, *, param: str, where: str) -> None:
    """Run the teacher on ``batch`` (the data's first) and compare its logits' shape with the
    student's ``student_output``: a ValueError before any training when they differ."""
    from prunelab._hooks import eval_mode

    try:
        with eval_mode(distill.teacher):
            teacher = distill.teacher_logits(loss, batch)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(
            f"the teacher (the 'distill_from' parameter of {where}) fails on the first batch of "
            f"'{param}': {type(err).__name__}: {err}"
        ) from err
    student = loss.logits(student_output)
    if teacher.shape != student.shape:
        raise ValueError(
            f"the teacher (the 'distill_from' parameter of {where}) gives logits of shape "
            f"{tuple(teacher.shape)} on the first batch of '{param}', but the model gives "
            f"{tuple(student.shape)}; distillation needs the same outputs (the same classes or "
            f"vocabulary)."
        )
    if not teacher.is_floating_point():
        raise ValueError(
            f"the teacher (the 'distill_from' parameter of {where}) gives {teacher.dtype} outputs; "
            f"distillation needs floating-point logits."
        )
