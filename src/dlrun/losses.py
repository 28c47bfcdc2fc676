"""The losses a run trains on: cross-entropy or MSE with the batch's score (`loss_and_score`), and knowledge
distillation's mix of a teacher's soft targets with the labels (`distill_loss`, Hinton, Vinyals and Dean 2015;
`trainer.distill.*`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_and_score(output: torch.Tensor, y: torch.Tensor, task: str, label_smoothing: float = 0.0,
                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (cross-entropy or MSE) and the batch's score sum (correct predictions or absolute errors).

    Per sample, both are means over its outputs (a regression sample has `horizon` of them), so a
    `reduction="sum"` loss divided by the number of samples equals the `"mean"` loss of training."""
    output = output.float()
    if task == "regression":
        errors = output - y  # (B, K)
        loss = errors.pow(2).mean() if reduction == "mean" else errors.pow(2).mean(dim=1).sum()
        return loss, errors.detach().abs().mean(dim=1).sum()
    loss = F.cross_entropy(output, y, label_smoothing=label_smoothing, reduction=reduction)
    labels = y.argmax(dim=1) if y.dim() == 2 else y  # mixed labels (trainer.mixup/cutmix): the larger share counts
    return loss, (output.detach().argmax(dim=1) == labels).sum()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, temperature: float,
                 alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard_loss.

    The KL divergence is averaged over the batch; T^2 keeps the soft targets' gradients on the
    scale of the hard loss's as T changes."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard_loss
