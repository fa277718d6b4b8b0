"""The upstream parity fixtures are reachable (a hard failure in CI, where MEDFM_REQUIRE_FIXTURES=1)."""

from __future__ import annotations

import pytest
from safetensors import safe_open

FAMILIES = ["spad", "mim", "unimiss", "lvm_med", "vis_mae"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fixtures_are_readable(family: str, upstream_fixtures) -> None:
    folder = upstream_fixtures(family)
    assert (folder / "README.md").is_file()
    tensors = sorted(folder.glob("*.safetensors"))
    assert tensors, f"{folder} holds no .safetensors file"
    with safe_open(str(tensors[0]), framework="pt") as handle:
        assert len(list(handle.keys())) > 0
