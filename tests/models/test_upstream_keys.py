"""Every family: the released base config, built on the meta device, has exactly the upstream checkpoint's
keys and shapes after the converter's key mapping (``<family>_upstream_keys.json`` beside the fixtures).

The table below holds one record per checkpoint; a record names its family, the key list's file and the
entry in it, builds the meta model, and maps one upstream key to ours (``None``: the converter drops it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

import medfm  # noqa: F401
from medfm.models.spad import SpadViTConfig, SpadViTForMaskedImageModeling, SpadVTConfig, SpadVTModel
from medfm.models.spad.convert_spad import convert_tokenizer_state_dict, convert_vit_state_dict

from ..conftest import SHIPPED_FIXTURES, fixtures_root


@dataclass(frozen=True)
class UpstreamKeys:
    """One released checkpoint whose upstream key list our base model must reproduce."""

    id: str
    family: str
    json_name: str
    #: Builds the released base model; called under ``torch.device("meta")``.
    build_meta_model: Callable[[], nn.Module]
    #: Upstream key -> our key, or ``None`` for a key the converter drops.
    map_key: Callable[[str], str | None]
    #: Where the record sits in the JSON (``()``: top level); it holds ``keys`` ({name: shape}).
    section: tuple[str, ...] = ()
    #: Where the record's total parameter count sits in it, if it states one.
    num_params: tuple[str, ...] | None = None
    #: Where the backbone's parameter count sits, and where the list of upstream keys it leaves out sits.
    backbone_params: tuple[tuple[str, ...], tuple[str, ...]] | None = None


def _one_key(convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], key: str) -> str | None:
    """Map one key through a converter of whole state dicts."""
    mapped = list(convert({key: torch.empty(0)}))
    assert len(mapped) <= 1, f"{key} maps to several keys: {mapped}"
    return mapped[0] if mapped else None


CHECKPOINTS = [
    UpstreamKeys(
        id="spad-vit-mim-base",
        family="spad",
        json_name="spad_upstream_keys.json",
        build_meta_model=lambda: SpadViTForMaskedImageModeling(SpadViTConfig()),
        map_key=partial(_one_key, convert_vit_state_dict),
        num_params=("config", "num_params_total"),
        backbone_params=(("config", "num_params_backbone"), ("mim_only_keys",)),
    ),
    UpstreamKeys(
        id="spad-vt-base",
        family="spad",
        json_name="spad_upstream_keys.json",
        build_meta_model=lambda: SpadVTModel(SpadVTConfig()),
        map_key=partial(_one_key, convert_tokenizer_state_dict),
        section=("tokenizer",),
        num_params=("num_params",),
    ),
]


def _at(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        record = record[name]
    return record


def upstream_keys_file(entry: UpstreamKeys) -> dict[str, Any]:
    """The entry's key list: from ``MEDFM_FIXTURES/<family>/`` when it holds one, else from tests/fixtures.

    The key lists describe the released checkpoints, not a fixture's tiny config, so a held-back fixture
    set need not repeat them.
    """
    candidates = [root / entry.family / entry.json_name for root in (fixtures_root(), SHIPPED_FIXTURES)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        pytest.fail(f"{entry.json_name} not found (looked in {[str(p) for p in candidates]})", pytrace=False)
    return json.loads(path.read_text())


@pytest.mark.parametrize("entry", CHECKPOINTS, ids=lambda entry: entry.id)
def test_base_model_has_upstream_keys_and_shapes(entry: UpstreamKeys) -> None:
    record = _at(upstream_keys_file(entry), entry.section)
    upstream: dict[str, list[int]] = record["keys"]
    with torch.device("meta"):
        model = entry.build_meta_model()
    state = model.state_dict()
    assert all(value.is_meta for value in state.values())
    ours = {key: list(value.shape) for key, value in state.items()}
    expected = {}
    for key, shape in upstream.items():
        mapped = entry.map_key(key)
        if mapped is not None:
            assert mapped not in expected, f"two upstream keys map to {mapped}"
            expected[mapped] = list(shape)
    assert sorted(set(expected) - set(ours)) == [], "upstream keys our model lacks"
    assert sorted(set(ours) - set(expected)) == [], "keys of our model upstream lacks"
    assert ours == expected
    if entry.num_params is not None:
        assert sum(v.numel() for v in state.values()) == _at(record, entry.num_params)
    if entry.backbone_params is not None:
        count, left_out = (_at(record, path) for path in entry.backbone_params)
        backbone = [entry.map_key(key) for key in upstream if key not in left_out]
        assert sum(state[key].numel() for key in backbone if key is not None) == count
