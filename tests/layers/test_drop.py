"""DropPath and the linear drop-path schedule against plain-torch definitions."""

from __future__ import annotations

import pytest
import torch

from medfm.layers.drop import DropPath, drop_path, drop_path_rates


@pytest.mark.parametrize("shape", [(4, 7, 5), (4, 3, 6, 6), (4, 3, 4, 4, 4)])
def test_drop_path_values_match_a_per_sample_bernoulli(shape) -> None:
    x = torch.randn(*shape)
    prob = 0.3
    torch.manual_seed(0)
    got = DropPath(prob).train()(x)
    torch.manual_seed(0)
    keep = torch.empty(shape[0]).bernoulli_(1 - prob).view(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(got, x * (keep / (1 - prob)), rtol=0, atol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(DropPath(prob, scale_by_keep=False).train()(x), x * keep, rtol=0, atol=0)


def test_drop_path_is_identity_in_eval_or_at_zero() -> None:
    x = torch.randn(3, 5, 2)
    assert DropPath(0.5).eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    assert drop_path(x, 0.9, training=False) is x


def test_drop_path_drops_whole_samples_and_keeps_the_mean() -> None:
    torch.manual_seed(1)
    out = DropPath(0.5).train()(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert bool(((per_sample == 0).all(1) | (per_sample == 2).all(1)).all())
    assert abs(out.mean().item() - 1.0) < 0.05


def test_drop_path_rejects_bad_probability() -> None:
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\]"):
        DropPath(1.5)


def test_rates_are_linear_float32_values() -> None:
    rates = drop_path_rates(0.1, 12)
    assert rates == [x.item() for x in torch.linspace(0, 0.1, 12)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert drop_path_rates(0.2, 1) == [0.0]
    assert drop_path_rates(0.2, 0) == []


def test_rates_per_stage_cut_one_schedule_over_all_blocks() -> None:
    """MiM: 0.2 linear over the 2+2+2+11 blocks (conv stages included); VIS-MAE: 0.1 over sum(depths)."""
    stages = drop_path_rates(0.2, depths=[2, 2, 2, 11])
    flat = [x.item() for x in torch.linspace(0, 0.2, 17)]
    assert [len(s) for s in stages] == [2, 2, 2, 11]
    assert [r for s in stages for r in s] == flat
    assert stages[3][-1] == pytest.approx(0.2)
    vis = drop_path_rates(0.1, depths=(2, 2, 6, 2))
    assert vis[2] == [x.item() for x in torch.linspace(0, 0.1, 12)][4:10]


def test_rates_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of depth"):
        drop_path_rates(0.1)
    with pytest.raises(ValueError, match="exactly one of depth"):
        drop_path_rates(0.1, 3, depths=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        drop_path_rates(0.1, depths=[2, -1])
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        drop_path_rates(-0.1, 3)
