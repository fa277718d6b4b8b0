"""Token pooling and the classification head against plain-torch definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfm.layers.heads import ClassificationHead, pool_tokens


def test_pooling() -> None:
    x = torch.randn(2, 7, 4)
    assert torch.equal(pool_tokens(x, "cls", 1), x[:, 0])
    torch.testing.assert_close(pool_tokens(x, "mean", 1), x[:, 1:].sum(1) / 6)
    torch.testing.assert_close(pool_tokens(x, "mean", 0), x.sum(1) / 7)
    torch.testing.assert_close(pool_tokens(x, "mean", 3), x[:, 3:].sum(1) / 4)


@pytest.mark.parametrize("norm_before_pool", [False, True])
def test_head_values(norm_before_pool) -> None:
    torch.manual_seed(0)
    head = ClassificationHead(
        8, 3, pooling="mean", num_prefix_tokens=0, norm="layernorm", norm_before_pool=norm_before_pool
    ).eval()
    with torch.no_grad():
        head.norm.weight.normal_()
        head.norm.bias.normal_()
    x = torch.randn(2, 5, 8)
    norm = lambda t: nn.functional.layer_norm(t, (8,), head.norm.weight, head.norm.bias, eps=1e-6)  # noqa: E731
    pooled = norm(x).mean(1) if norm_before_pool else norm(x.mean(1))
    want = pooled @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(x), want, atol=1e-6, rtol=1e-5)


def test_head_cls_without_norm() -> None:
    head = ClassificationHead(4, 2)
    x = torch.randn(3, 6, 4)
    torch.testing.assert_close(head(x), head.classifier(x[:, 0]))
    assert isinstance(head.norm, nn.Identity)
    assert sorted(head.state_dict()) == ["classifier.bias", "classifier.weight"]


def test_bad_inputs() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean'"):
        pool_tokens(x, "max")
    with pytest.raises(ValueError, match="needs a class token"):
        pool_tokens(x, "cls", 0)
    with pytest.raises(ValueError, match="no patch tokens"):
        pool_tokens(x, "mean", 3)
    with pytest.raises(ValueError, match="hidden_states must be"):
        pool_tokens(torch.randn(2, 4), "mean")
    with pytest.raises(ValueError, match="norm must be None or 'layernorm'"):
        ClassificationHead(4, 2, norm="batchnorm")
    with pytest.raises(ValueError, match="pooling must be"):
        ClassificationHead(4, 2, pooling="max")
