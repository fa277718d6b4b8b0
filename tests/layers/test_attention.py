"""The attention core: eager attention against softmax(q k^T) v written out, the dispatch through
ALL_ATTENTION_FUNCTIONS following config._attn_implementation, and head split/merge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medfm.layers.attention import AttentionCore, eager_attention_forward, merge_heads, split_heads


def _qkv(batch=2, heads=3, length=7, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3)]


def test_eager_attention_is_the_definition() -> None:
    query, key, value = _qkv()
    mask = torch.zeros(1, 1, 7, 7)
    mask[..., 5:] = float("-inf")  # the last two keys are hidden
    module = torch.nn.Module().eval()
    output, weights = eager_attention_forward(module, query, key, value, mask, scaling=0.5)
    scores = (query @ key.transpose(-1, -2)) * 0.5 + mask
    expected = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(output, (expected @ value).transpose(1, 2))
    assert torch.all(weights[..., 5:] == 0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attend_dispatches_and_agrees(implementation: str) -> None:
    config = SimpleNamespace(_attn_implementation=implementation, attention_dropout=0.0)
    core = AttentionCore(config, num_heads=3, head_dim=4).eval()
    query, key, value = _qkv()
    output, weights = core.attend(query, key, value)
    reference, _ = eager_attention_forward(core, query, key, value, None, scaling=4**-0.5)
    torch.testing.assert_close(output, reference, atol=1e-6, rtol=1e-5)
    assert (weights is not None) == (implementation == "eager")


def test_attend_follows_a_changed_implementation() -> None:
    calls = []

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        calls.append(kwargs)
        return eager_attention_forward(module, query, key, value, attention_mask, scaling)

    from transformers import AttentionInterface

    AttentionInterface.register("medfm_test_spy", spy)
    config = SimpleNamespace(_attn_implementation="eager")
    core = AttentionCore(config, num_heads=3, head_dim=4)
    config._attn_implementation = "medfm_test_spy"
    core.attend(*_qkv(), cu_seqlens=torch.tensor([0, 7]))
    assert calls and "cu_seqlens" in calls[0]


def test_split_and_merge_heads_round_trip() -> None:
    x = torch.randn(2, 5, 12)
    split = split_heads(x, 3)
    assert split.shape == (2, 5, 3, 4)
    torch.testing.assert_close(split[:, :, 1], x[:, :, 4:8])
    torch.testing.assert_close(merge_heads(split), x)
