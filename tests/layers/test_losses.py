"""Losses against their plain definitions, the reference deep-supervision loss and the VIS-MAE fixture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from medfm.layers.losses import (
    deep_supervision_loss,
    deep_supervision_weights,
    masked_reconstruction_loss,
    soft_target_cross_entropy,
)
from medfm.layers.patch_embed import patchify


def test_soft_target_cross_entropy() -> None:
    logits = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    target = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    want = -(target.float().softmax(-1) * logits.float().log_softmax(-1)).sum(-1).mean()
    got = soft_target_cross_entropy(logits, target)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    one_hot = torch.full((4, 3), -1e4)
    one_hot[torch.arange(4), torch.tensor([0, 2, 1, 1])] = 1e4
    x = torch.randn(4, 3)
    torch.testing.assert_close(soft_target_cross_entropy(x, one_hot), F.cross_entropy(x, one_hot.argmax(-1)))
    with pytest.raises(ValueError, match="differ"):
        soft_target_cross_entropy(x, one_hot[:, :2])


def _mae_loss(pred, target, mask, norm_pix):
    # MAE's forward_loss on patchified targets.
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_reconstruction_matches_mae(norm_pix) -> None:
    pred, target = torch.randn(2, 10, 12), torch.randn(2, 10, 12)
    mask = (torch.rand(2, 10) > 0.5).float()
    mask[:, 0] = 1
    assert torch.equal(
        masked_reconstruction_loss(pred, target, mask, norm_pix), _mae_loss(pred, target, mask, norm_pix)
    )
    torch.testing.assert_close(
        masked_reconstruction_loss(pred, target, mask.bool(), norm_pix),
        _mae_loss(pred, target, mask, norm_pix),
    )


def test_masked_reconstruction_counts_masked_patches_only() -> None:
    pred = torch.zeros(1, 4, 3)
    target = torch.tensor([[[1.0] * 3, [2.0] * 3, [100.0] * 3, [3.0] * 3]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert masked_reconstruction_loss(pred, target, mask).item() == pytest.approx((1 + 4) / 2)


def test_masked_reconstruction_reproduces_vis_mae(upstream_fixtures) -> None:
    folder = upstream_fixtures("vis_mae")
    inputs, expected = load_file(folder / "inputs.safetensors"), load_file(folder / "expected.safetensors")
    pred, mask, pixels = expected["mae_pred"], expected["mae_mask"], inputs["pixel_values"]
    patch = int((pred.shape[2] // pixels.shape[1]) ** 0.5)
    target = patchify(pixels, patch)
    torch.testing.assert_close(
        masked_reconstruction_loss(pred, target, mask), expected["mae_loss"][0], atol=2e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        masked_reconstruction_loss(pred, target, mask, norm_pix=True),
        expected["mae_loss_norm_pix"][0],
        atol=2e-5,
        rtol=1e-4,
    )


def test_masked_reconstruction_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected prediction and target \(B, L, P\)"):
        masked_reconstruction_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask"):
        masked_reconstruction_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.ones(2, 5))


def test_deep_supervision_weights() -> None:
    weights = torch.tensor([0.5**i for i in range(4)])
    assert deep_supervision_weights(4) == (weights / weights.sum()).tolist()
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(4, "equal") == [0.25] * 4
    with pytest.raises(ValueError, match="rule must be"):
        deep_supervision_weights(3, "cubic")
    with pytest.raises(ValueError, match="at least one"):
        deep_supervision_weights(0)


def _reference(outputs, labels, mode):
    # The existing reference, copied verbatim (only the interpolation mode is a parameter for 2D).
    from monai.losses import DiceCELoss

    criterion = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
    weights = torch.tensor([0.5**i for i in range(len(outputs))])
    weights = weights / weights.sum()
    target = labels.long().unsqueeze(1)
    total = outputs[0].new_zeros(())
    for weight, logits in zip(weights.tolist(), outputs):
        if logits.shape[2:] != target.shape[2:]:
            logits = F.interpolate(logits, size=target.shape[2:], mode=mode, align_corners=False)
        total = total + weight * criterion(logits.float(), target)
    return total


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_deep_supervision_matches_the_reference(spatial_dims) -> None:
    torch.manual_seed(0)
    size = (8, 8, 4) if spatial_dims == 3 else (8, 12)
    labels = torch.randint(0, 3, (2, *size))
    outputs = [torch.randn(2, 3, *[s // 2**i for s in size], requires_grad=True) for i in range(3)]
    mode = "trilinear" if spatial_dims == 3 else "bilinear"
    got = deep_supervision_loss(outputs, labels)
    assert torch.equal(got, _reference(outputs, labels, mode))
    assert torch.equal(deep_supervision_loss(outputs, labels.unsqueeze(1)), got)
    got.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)


def test_deep_supervision_custom_criterion_and_weights() -> None:
    labels = torch.randint(0, 2, (1, 4, 4))
    outputs = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    criterion = lambda logits, target: F.cross_entropy(logits, target[:, 0])  # noqa: E731
    up = F.interpolate(outputs[1], size=(4, 4), mode="bilinear", align_corners=False)
    want = 0.25 * F.cross_entropy(outputs[0], labels) + 0.75 * F.cross_entropy(up, labels)
    torch.testing.assert_close(deep_supervision_loss(outputs, labels, criterion, [0.25, 0.75]), want)


def test_deep_supervision_bad_inputs() -> None:
    labels = torch.randint(0, 2, (1, 4, 4))
    with pytest.raises(ValueError, match="outputs is empty"):
        deep_supervision_loss([], labels)
    with pytest.raises(ValueError, match="2 weights for 1 outputs"):
        deep_supervision_loss([torch.randn(1, 2, 4, 4)], labels, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="labels must be"):
        deep_supervision_loss([torch.randn(1, 2, 4, 4)], torch.randint(0, 2, (4, 4)))
    with pytest.raises(ValueError, match="all outputs need 2 spatial axes"):
        deep_supervision_loss([torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2, 2)], labels)
