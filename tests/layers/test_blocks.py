"""The pre-norm block against its definition, with drop path in training, and under checkpointing."""

from __future__ import annotations

import torch
from torch import nn

from medfm.layers.blocks import PreNormBlock


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x, scale: float = 1.0):
        return self.proj(x) * scale, None


def _block(drop_path: float = 0.0) -> PreNormBlock:
    torch.manual_seed(0)
    return PreNormBlock(nn.LayerNorm(8), _Attention(8), nn.LayerNorm(8), nn.Linear(8, 8), drop_path)


def test_block_is_the_residual_definition_and_passes_arguments() -> None:
    block = _block().eval()
    x = torch.randn(2, 5, 8)
    h = x + block.attn.proj(block.norm1(x)) * 2.0
    expected = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(block(x, scale=2.0), expected)


def test_drop_path_drops_whole_samples_in_training_only() -> None:
    block = _block(drop_path=0.5)
    x = torch.randn(64, 3, 8)
    assert torch.equal(block.eval()(x), _block(drop_path=0.0).eval()(x))
    torch.manual_seed(1)
    out = block.train()(x)
    # Some samples keep neither branch (output = input), the others are rescaled by 1 / keep.
    untouched = (out - x).abs().amax(dim=(1, 2)) == 0
    assert 0 < int(untouched.sum()) < 64


def test_checkpointed_block_gives_the_same_gradients() -> None:
    x = torch.randn(2, 5, 8, requires_grad=True)
    grads = []
    for checkpointing in (False, True):
        block = _block().train()
        block.gradient_checkpointing = checkpointing
        if checkpointing:
            import functools

            from torch.utils.checkpoint import checkpoint

            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        block(x).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
