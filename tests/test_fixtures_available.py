"""The upstream parity fixtures are reachable: shipped in tests/fixtures, or replaced by MEDFM_FIXTURES.

A missing family folder fails (never skips): the parity tests cannot be left out silently.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from .conftest import SHIPPED_FIXTURES

FAMILIES = ["spad", "mim", "unimiss", "lvm_med", "vis_mae"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fixtures_are_readable(family: str, upstream_fixtures) -> None:
    folder = upstream_fixtures(family)
    assert (folder / "README.md").is_file()
    config_path = folder / "upstream_config.json"
    assert config_path.is_file(), f"{config_path} is missing"
    config = json.loads(config_path.read_text())
    assert isinstance(config, dict) and config, f"{config_path} holds no configuration"
    assert "default" in config.get("tolerances", {}), f"{config_path} has no tolerances.default"
    tensors = sorted(folder.glob("*.safetensors"))
    assert tensors, f"{folder} holds no .safetensors file"
    for path in tensors:
        with safe_open(str(path), framework="pt") as handle:
            assert len(list(handle.keys())) > 0, f"{path} holds no tensor"


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_fixtures_hold_the_upstream_key_lists(family: str) -> None:
    """The released checkpoints' key lists ship beside each family's fixtures (a held-back set may omit them)."""
    paths = sorted(SHIPPED_FIXTURES.joinpath(family).glob(f"{family}_upstream*keys.json"))
    assert paths, f"no {family}_upstream_keys.json in {SHIPPED_FIXTURES / family}"
    for path in paths:
        assert json.loads(path.read_text()), f"{path} is empty"


def test_missing_family_fails_not_skips(tmp_path, monkeypatch, upstream_fixtures) -> None:
    monkeypatch.setenv("MEDFM_FIXTURES", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="parity fixtures for 'spad' are missing"):
        upstream_fixtures("spad")
