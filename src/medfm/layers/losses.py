"""Training losses shared by the families: soft-target cross-entropy, masked reconstruction, deep supervision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "deep_supervision_loss",
    "deep_supervision_weights",
    "masked_reconstruction_loss",
    "soft_target_cross_entropy",
]


def soft_target_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the softmax of ``target_logits`` over the last axis, averaged over the rest.

    Computed in float32 whatever the input dtype (SPAD's MIM target, a tokenizer distribution, is given as
    logits).
    """
    if logits.shape != target_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_logits {tuple(target_logits.shape)} differ"
        )
    return -(target_logits.float().softmax(-1) * logits.float().log_softmax(-1)).sum(-1).mean()


def masked_reconstruction_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MAE's loss (He et al., CVPR 2022): per-patch mean squared error, averaged over masked patches only.

    ``sum_l(mse_l * mask_l) / sum_l(mask_l)``. MiM (spec §2.4) and VIS-MAE (spec §2; an MSE, not SimMIM's L1)
    both use it as is.

    Args:
        prediction: ``(B, L, P)`` predicted patches.
        target: ``(B, L, P)`` patchified image (see :func:`medfm.layers.patch_embed.patchify`).
        mask: ``(B, L)``, 1 = masked (counted), 0 = visible.
        norm_pix: Normalise each target patch as ``(t - mean) / sqrt(var + eps)``, with the **unbiased**
            variance (torch's default, which MAE, MiM and VIS-MAE use).
        eps: Added to the variance.

    Raises:
        ValueError: Shapes disagree.
    """
    if (
        prediction.shape != target.shape
        or prediction.ndim != 3
        or tuple(mask.shape) != tuple(target.shape[:2])
    ):
        raise ValueError(
            f"expected prediction and target (B, L, P) and mask (B, L); got {tuple(prediction.shape)}, "
            f"{tuple(target.shape)} and {tuple(mask.shape)}"
        )
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((prediction - target) ** 2).mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


def deep_supervision_weights(n: int, rule: Literal["halving", "equal"] = "halving") -> list[float]:
    """Weights of ``n`` deep-supervision outputs (finest first), normalised to sum to 1.

    ``"halving"``: ``0.5 ** i`` (nnU-Net's choice, Isensee et al., Nature Methods 2021); ``"equal"``: ``1 / n``.
    They are computed in float32 and returned as the Python floats of those float32 values.
    """
    if n < 1:
        raise ValueError(f"need at least one output; got {n}")
    if rule == "halving":
        weights = torch.tensor([0.5**i for i in range(n)])
    elif rule == "equal":
        weights = torch.ones(n)
    else:
        raise ValueError(f"rule must be 'halving' or 'equal'; got {rule!r}")
    return (weights / weights.sum()).tolist()


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of a segmentation loss over logits at several resolutions.

    Each coarser logit map is resized to the label grid (trilinear in 3D, bilinear in 2D, no corner
    alignment) rather than the labels being down-sampled, and the loss is taken in float32.

    Args:
        outputs: Logits ``(B, K, *spatial)``, finest first.
        labels: Integer class map ``(B, *spatial)`` (or ``(B, 1, *spatial)``).
        criterion: ``(logits, target (B, 1, *spatial) long) -> loss``; MONAI's
            ``DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)`` when ``None``.
        weights: One per output; :func:`deep_supervision_weights` ``(len(outputs))`` when ``None``.

    Raises:
        ValueError: No outputs, a weight count mismatch, or logits whose rank does not match the labels.
    """
    if not outputs:
        raise ValueError("outputs is empty")
    if criterion is None:
        from monai.losses import DiceCELoss

        criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    weights = deep_supervision_weights(len(outputs)) if weights is None else list(weights)
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} weights for {len(outputs)} outputs")
    spatial_dims = outputs[0].ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"logits must be (B, K, H, W) or (B, K, D, H, W); got {tuple(outputs[0].shape)}")
    target = labels.long()
    if target.ndim == spatial_dims + 1:
        target = target.unsqueeze(1)
    if target.ndim != spatial_dims + 2 or target.shape[1] != 1:
        raise ValueError(
            f"labels must be (B, *spatial) for {spatial_dims}D logits; got {tuple(labels.shape)}"
        )
    mode = "trilinear" if spatial_dims == 3 else "bilinear"
    total = outputs[0].new_zeros(())
    for weight, logits in zip(weights, outputs):
        if logits.ndim != spatial_dims + 2:
            raise ValueError(f"all outputs need {spatial_dims} spatial axes; got {tuple(logits.shape)}")
        if logits.shape[2:] != target.shape[2:]:
            logits = F.interpolate(logits, size=target.shape[2:], mode=mode, align_corners=False)
        total = total + weight * criterion(logits.float(), target)
    return total
