"""SPAD fixtures: the upstream tensors, their upstream_config.json and its tolerances, and tiny configs.

The parity tests take every config from the fixture folder (see :class:`SpadFixtures`); ``TINY_VIT`` and
``TINY_VT`` are only the sizes other SPAD tests build models with.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medfm.models.spad import SpadViTConfig, SpadVTConfig

# Tiny sizes for tests other than parity (the parity tests read theirs from upstream_config.json).
TINY_VIT = dict(
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    pos_embed_shape=(3, 5, 5),
    codebook_size=64,
    mask_layer_ids=[2, 3],
    out_indices=[0, 1, 2, 3],
)
TINY_VT = dict(
    downsample_channels=[8, 16, 16], upsample_channels=[8, 16, 16], codebook_size=64, embedding_dim=16
)

EXPECTED_FILE = "expected.safetensors"

# Upstream constructor arguments shapes cannot tell, by their upstream name, and our config field. Only
# those present in upstream_config.json are passed.
VIT_ARGUMENTS = {
    "num_heads": "num_attention_heads",
    "mask_ratio": "mask_ratio",
    "mask_layer_ids": "mask_layer_ids",
    "rope_base": "rope_base",
    "rope_rescale_shape": "rope_rescale_shape",
    "layer_norm_eps": "layer_norm_eps",
}
# Upstream arguments of the segmentation adapter that change the converted backbone, and our field.
ADAPTER_ARGUMENTS = {
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "pos_embed_shape": "pos_embed_shape",
    "adaptive_patch_embed": "adaptive_patch_embed",
    "out_indexes": "out_indices",
}
# Upstream choices medfm implements one way only: a fixture made with another value cannot be matched.
VIT_FIXED = {"sub_ln": True, "rope_merge_hw": True, "drop_rate": 0.0, "drop_path_rate": 0.0}
# The tokenizer input transforms upstream_config.json may name.
TOKENIZER_INPUTS = {"2*x-1": lambda x: 2 * x - 1, "x": lambda x: x}

# Output suffixes of each kind of fixture input prefix (``{prefix}.{suffix}`` in expected.safetensors);
# ``{i}`` runs over blocks, ``{j}`` over the adapter's out_indexes.
VIT_OUTPUTS = ("embeddings", "block_{i}", "last_hidden_state", "rope_cos", "rope_sin")
TOKENIZER_OUTPUTS = ("z", "logits", "z_q", "x_rec")
MIM_OUTPUTS = ("tokenizer_logits", "masked_mask", "last_hidden_state", "masked_logits", "loss")
ADAPTER_OUTPUTS = ("block_{i}", "feature_{j}")


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted(handle.keys())


def _prefixes(keys: list[str]) -> list[str]:
    return sorted({key.split(".", 1)[0] for key in keys if "." in key})


def discover_inputs(folder: Path) -> dict[str, list[str]]:
    """The input prefixes of each kind, found by the keys of ``inputs`` and ``expected.safetensors``.

    ``vit``: a ``vit*`` prefix with ``.pixel_values`` and ``.last_hidden_state``; ``vit2d``: those of them
    with one slice (a 2D image); ``tok``: a ``tok*`` prefix with ``.pixel_values`` and ``.z``; ``mim``: a
    prefix with ``.visible_idx`` and ``.masked_logits``; ``adapter``: a prefix with ``.pixel_values`` and
    ``.feature_0``.
    """
    inputs, expected = set(_keys(folder / "inputs.safetensors")), set(_keys(folder / EXPECTED_FILE))
    found: dict[str, list[str]] = {"vit": [], "vit2d": [], "tok": [], "mim": [], "adapter": []}
    for prefix in _prefixes(sorted(inputs)):
        if (
            prefix.startswith("vit")
            and {f"{prefix}.pixel_values"} <= inputs
            and (f"{prefix}.last_hidden_state" in expected)
        ):
            found["vit"].append(prefix)
            with safe_open(str(folder / "inputs.safetensors"), framework="pt") as handle:
                if handle.get_slice(f"{prefix}.pixel_values").get_shape()[2] == 1:
                    found["vit2d"].append(prefix)
        elif prefix.startswith("tok") and f"{prefix}.pixel_values" in inputs and f"{prefix}.z" in expected:
            found["tok"].append(prefix)
        elif f"{prefix}.visible_idx" in inputs and f"{prefix}.masked_logits" in expected:
            found["mim"].append(prefix)
        elif f"{prefix}.pixel_values" in inputs and f"{prefix}.feature_0" in expected:
            found["adapter"].append(prefix)
    return found


class SpadFixtures:
    """One SPAD fixture folder: tensors, ``upstream_config.json`` and the configs built from them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.upstream_config: dict[str, Any] = json.loads((folder / "upstream_config.json").read_text())
        self.vit_state = load_file(str(folder / "upstream_state_dict.safetensors"))
        self.tokenizer_state = load_file(str(folder / "tokenizer_state_dict.safetensors"))
        self.adapter_state = load_file(str(folder / "adapter_state_dict.safetensors"))
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.expected = load_file(str(folder / EXPECTED_FILE))

    # --- the upstream arguments --------------------------------------------------------------------

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.upstream_config:
            pytest.fail(f"{self.folder / 'upstream_config.json'} has no {name!r} entry", pytrace=False)
        return self.upstream_config[name]

    @property
    def vit_arguments(self) -> dict[str, Any]:
        """The upstream ``ViTForMIM`` constructor arguments."""
        return self.section("vit_mim")

    @property
    def tokenizer_arguments(self) -> dict[str, Any]:
        return self.section("tokenizer")

    @property
    def adapter_arguments(self) -> dict[str, Any]:
        """The upstream ``SimpleViTAdapter`` arguments (ViT arguments it does not state are the MIM model's)."""
        return self.upstream_config.get("adapter", {})

    # --- configs: shapes through the converter's inference, plus what shapes cannot tell ---------------

    @property
    def vit_overrides(self) -> dict[str, Any]:
        """Our config fields that the ViT tensors' shapes cannot tell, from upstream_config.json."""
        arguments = self.vit_arguments
        overrides = {ours: arguments[theirs] for theirs, ours in VIT_ARGUMENTS.items() if theirs in arguments}
        if "out_indexes" in self.adapter_arguments:
            overrides["out_indices"] = self.adapter_arguments["out_indexes"]
        return overrides

    @property
    def adapter_overrides(self) -> dict[str, Any]:
        """The fields of the converted model that the segmentation adapter changes (it re-cuts patches)."""
        arguments = self.adapter_arguments
        return {ours: arguments[theirs] for theirs, ours in ADAPTER_ARGUMENTS.items() if theirs in arguments}

    @cached_property
    def vit_config(self) -> SpadViTConfig:
        from medfm.models.spad.convert_spad import infer_vit_config

        return infer_vit_config(self.vit_state, self.vit_overrides)

    @cached_property
    def tokenizer_config(self) -> SpadVTConfig:
        from medfm.models.spad.convert_spad import convert_tokenizer_state_dict, infer_tokenizer_config

        return infer_tokenizer_config(convert_tokenizer_state_dict(self.tokenizer_state))

    @property
    def vit_input_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ImageNet-style mean and std the MIM ViT input is normalised with, shaped for (B, C, D, H, W)."""
        norm = self.vit_arguments["input_norm"]
        return (
            torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1, 1),
            torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1, 1),
        )

    def tokenizer_input(self, x: torch.Tensor) -> torch.Tensor:
        name = self.vit_arguments.get("tokenizer_input", "x")
        if name not in TOKENIZER_INPUTS:
            pytest.fail(f"unknown tokenizer_input {name!r} in upstream_config.json", pytrace=False)
        return TOKENIZER_INPUTS[name](x)

    # --- inputs and tolerances -------------------------------------------------------------------------

    @cached_property
    def discovered(self) -> dict[str, list[str]]:
        return discover_inputs(self.folder)

    def expected_outputs(self, prefix: str, suffixes: tuple[str, ...], *, blocks: int, features: int) -> set:
        """The expected keys ``prefix.suffix`` for ``suffixes``, ``{i}`` and ``{j}`` expanded."""
        keys = set()
        for suffix in suffixes:
            if "{i}" in suffix:
                keys.update(f"{prefix}.{suffix.format(i=i)}" for i in range(blocks))
            elif "{j}" in suffix:
                keys.update(f"{prefix}.{suffix.format(j=j)}" for j in range(features))
            else:
                keys.add(f"{prefix}.{suffix}")
        return keys

    def tolerance(self, key: str, file: str = EXPECTED_FILE) -> dict[str, float] | None:
        """``assert_close`` tolerances of ``key`` in ``file`` from upstream_config.json's "tolerances".

        Looks up ``file:key``, the bare ``key`` (for expected.safetensors), ``file:*``, then ``default``;
        a given ``atol`` without ``rtol`` (or the reverse) means the other is 0. ``None``: do not compare.
        """
        table = self.upstream_config.get("tolerances", {})
        names = [f"{file}:{key}"] + ([key] if file == EXPECTED_FILE else []) + [f"{file}:*", "default"]
        entry = next((table[name] for name in names if name in table), None)
        if entry is None:
            pytest.fail(f"{self.folder / 'upstream_config.json'} has no tolerances.default", pytrace=False)
        if entry.get("compare", True) is False:
            return None
        return {"atol": float(entry.get("atol", 0.0)), "rtol": float(entry.get("rtol", 0.0))}

    def assert_close(
        self,
        actual: torch.Tensor,
        key: str,
        *,
        expected: torch.Tensor | None = None,
        file: str = EXPECTED_FILE,
    ) -> None:
        """Compare ``actual`` with ``expected`` (by default ``expected.safetensors[key]``) at the tolerance
        upstream_config.json gives ``key`` of ``file``."""
        if expected is None:
            if key not in self.expected:
                pytest.fail(f"{self.folder / EXPECTED_FILE} has no {key!r}", pytrace=False)
            expected = self.expected[key]
        tolerance = self.tolerance(key, file)
        if tolerance is not None:
            torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{file}:{key}: {m}")


@pytest.fixture(scope="session")
def spad(upstream_fixtures) -> SpadFixtures:
    return SpadFixtures(upstream_fixtures("spad"))


@pytest.fixture
def tiny_vit_config() -> SpadViTConfig:
    return SpadViTConfig(**TINY_VIT)


@pytest.fixture
def tiny_vt_config() -> SpadVTConfig:
    return SpadVTConfig(**TINY_VT)
