"""Classification evaluation: accuracy and one-vs-rest ROC AUC."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# The data pieces moved to medfm.data; importable from here as before.
from ..data.classification import (
    ClassificationSample,
    GroupedBatchSampler,
    load_classification_items,
    stratified_split,
)
from ..models.modeling_utils import model_contract

__all__ = [
    "ClassificationSample",
    "GroupedBatchSampler",
    "evaluate_classification",
    "load_classification_items",
    "stratified_split",
]


def evaluate_classification(
    model: nn.Module, samples: Sequence[ClassificationSample]
) -> dict[str, float | None]:
    """Accuracy and (one-vs-rest, macro) ROC AUC of ``model`` on ``samples``, one at a time.

    AUC needs a positive and a negative sample of some class: with a single class in ``samples`` it cannot be
    computed and is ``None`` (``null`` in JSON), never NaN.
    """
    device = next(model.parameters()).device
    contract = model_contract(model)
    probabilities, labels = [], []
    with torch.no_grad():
        for sample in samples:
            pixel_values = contract.as_model_input(sample.pixel_values[None].to(device))
            logits = model(**contract.model_inputs(pixel_values, sample.spacing)).logits
            probabilities.append(logits.float().softmax(-1)[0].cpu())
            labels.append(sample.label)
    scores = torch.stack(probabilities)
    targets = torch.tensor(labels)
    result: dict[str, float | None] = {"accuracy": float((scores.argmax(1) == targets).float().mean())}
    aucs = [
        _auc(scores[:, k], targets == k)
        for k in range(scores.shape[1])
        if 0 < int((targets == k).sum()) < len(targets)
    ]
    result["auc"] = float(sum(aucs) / len(aucs)) if aucs else None
    return result


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC as the probability that a positive outscores a negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).float().sum()
    ties = (pos[:, None] == neg[None, :]).float().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
