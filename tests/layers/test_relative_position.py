"""N-D relative position index and bias against the Swin 2D formula, a 3D brute-force loop and the fixtures."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

from medfm.layers.relative_position import RelativePositionBias, relative_position_index


def _swin_2d_index(wh: int, ww: int) -> torch.Tensor:
    # The Swin Transformer paper's construction, written out.
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def _brute_force_3d(size) -> torch.Tensor:
    points = list(itertools.product(*[range(w) for w in size]))
    b, c = 2 * size[1] - 1, 2 * size[2] - 1
    index = torch.empty(len(points), len(points), dtype=torch.long)
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            r = [p[k] - q[k] + size[k] - 1 for k in range(3)]
            index[i, j] = r[0] * b * c + r[1] * c + r[2]
    return index


@pytest.mark.parametrize("window", [(7, 7), (2, 2), (3, 5), (1, 4)])
def test_2d_index_matches_swin(window) -> None:
    assert torch.equal(relative_position_index(window), _swin_2d_index(*window))


@pytest.mark.parametrize("window", [(2, 3, 4), (1, 2, 3), (4, 4, 2), (3, 3, 3)])
def test_3d_index_matches_brute_force(window) -> None:
    index = relative_position_index(window)
    assert index.dtype == torch.long
    assert torch.equal(index, _brute_force_3d(window))
    assert int(index.max()) + 1 <= (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)


def _stored_windows(upstream_fixtures):
    """(window, stored index) for every index buffer of the MiM seg/cls and VIS-MAE fixtures.

    MiM's fine-tuning attention is global over the stage-4 grid (input / 16 per axis, spec §1.2); VIS-MAE uses
    square windows of ``window_size`` (2D).
    """
    mim_config = json.loads((upstream_fixtures("mim") / "upstream_config.json").read_text())
    vis_config = json.loads((upstream_fixtures("vis_mae") / "upstream_config.json").read_text())
    sources = [
        ("mim", "upstream_seg_state_dict.safetensors", mim_config["segmentation"]["backbone"]["img_size"][0]),
        ("mim", "upstream_cls_state_dict.safetensors", mim_config["classification"]["img_size"][0]),
        ("vis_mae", "upstream_state_dict.safetensors", None),
    ]
    for family, file, image_size in sources:
        if image_size is None:
            window = (vis_config["mae"]["window_size"],) * 2
        else:
            window = tuple(s // 16 for s in image_size)
        state = load_file(upstream_fixtures(family) / file)
        for key, stored in state.items():
            if key.endswith("relative_position_index"):
                yield key, window, stored


def test_index_matches_upstream_buffers(upstream_fixtures) -> None:
    found = list(_stored_windows(upstream_fixtures))
    assert {len(window) for _, window, _ in found} == {2, 3}
    for key, window, stored in found:
        assert torch.equal(relative_position_index(window), stored), key


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _brute_force_nd(size):
    points = list(itertools.product(*[range(w) for w in size]))
    radices = [2 * w - 1 for w in size]
    index = torch.empty(len(points), len(points), dtype=torch.long)
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            value = 0
            for k, radix in enumerate(radices):
                value = value * radix + p[k] - q[k] + size[k] - 1
            index[i, j] = value
    return index


@pytest.mark.parametrize("window", [(2, 3), (2, 2, 3)])
def test_bias_gathers_the_table(window) -> None:
    module = RelativePositionBias(window, num_heads=3)
    rows = _prod([2 * w - 1 for w in window])
    assert module.relative_position_bias_table.shape == (rows, 3)
    assert not module.relative_position_bias_table.any()  # zero init
    with torch.no_grad():
        module.relative_position_bias_table.copy_(torch.randn(rows, 3))
    bias = module()
    n = _prod(window)
    assert bias.shape == (3, n, n)
    index = _brute_force_nd(window)
    table = module.relative_position_bias_table
    for h in range(3):
        for i in range(n):
            for j in range(n):
                assert bias[h, i, j] == table[index[i, j], h]
    bias.sum().backward()
    assert table.grad is not None


def test_index_buffer_is_not_persistent() -> None:
    module = RelativePositionBias((2, 2, 2), num_heads=2)
    assert list(module.state_dict()) == ["relative_position_bias_table"]
    assert "relative_position_index" in dict(module.named_buffers())


def test_bad_windows_are_rejected() -> None:
    with pytest.raises(ValueError, match="window_size must be a non-empty sequence of positive ints"):
        relative_position_index(())
    with pytest.raises(ValueError, match="window_size must be"):
        RelativePositionBias((2, 0), num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        RelativePositionBias((2, 2), num_heads=0)
