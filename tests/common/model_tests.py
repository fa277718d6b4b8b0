"""Tests every medfm model class runs.

A family subclasses :class:`CommonModelTests` once per model class (its name starting with ``Test``) and
supplies a tiny config and inputs. The tests: save/load round trip, Auto class resolution, loading by repo
id from a Hub-layout cache offline, eager vs sdpa, activation checkpointing gradients, batch vs single
sample, a bfloat16 forward, 2D as well as 3D inputs where the family takes both, the medfm model contract
the pipelines and the loop rely on, and that every parameter takes part in the forward (DDP with
``find_unused_parameters=False`` fails otherwise).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import AutoConfig

import medfm  # noqa: F401  (registers the models)
from medfm.models.modeling_utils import MedfmModelMixin

from .hub_cache import add_to_hub_cache


def _float_tensors(outputs: Any) -> list[torch.Tensor]:
    values = outputs.to_tuple() if hasattr(outputs, "to_tuple") else (outputs,)
    flat: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            flat.append(value)
        elif isinstance(value, tuple | list):
            flat.extend(v for v in value if isinstance(v, torch.Tensor) and v.is_floating_point())
    return flat


def assert_outputs_close(a: Any, b: Any, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    left, right = _float_tensors(a), _float_tensors(b)
    assert len(left) == len(right) and left, "outputs differ in structure or hold no tensor"
    for x, y in zip(left, right):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


class CommonModelTests:
    """Mixin of the common tests; see the module docstring."""

    model_class: ClassVar[type]
    auto_class: ClassVar[type]
    supports_2d: ClassVar[bool] = False
    supports_checkpointing: ClassVar[bool] = True

    # --- what a family provides -------------------------------------------------------------------

    def make_config(self):
        raise NotImplementedError

    def make_inputs(self, batch_size: int = 2, two_d: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------------------

    def build(self, **config_overrides):
        torch.manual_seed(0)
        config = self.make_config()
        for key, value in config_overrides.items():
            setattr(config, key, value)
        return self.model_class(config).eval()

    @staticmethod
    def run(model, inputs: dict[str, Any]):
        with torch.no_grad():
            return model(**inputs)

    @staticmethod
    def select(inputs: dict[str, Any], index: int) -> dict[str, Any]:
        """Sample ``index`` of every batched tensor input (batch dim first)."""
        out = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and key != "spacing":
                out[key] = value[index : index + 1]
            else:
                out[key] = value
        return out

    # --- the tests --------------------------------------------------------------------------------

    def test_save_load_round_trip(self, tmp_path: Path) -> None:
        model = self.build()
        inputs = self.make_inputs()
        model.save_pretrained(tmp_path)
        reloaded = self.model_class.from_pretrained(tmp_path).eval()
        assert_outputs_close(self.run(model, inputs), self.run(reloaded, inputs), atol=0, rtol=0)

    def test_auto_class_resolution(self, tmp_path: Path) -> None:
        model = self.build()
        model.save_pretrained(tmp_path)
        config = AutoConfig.from_pretrained(tmp_path)
        assert type(config) is type(model.config)
        assert type(self.auto_class.from_config(config)) is self.model_class
        assert type(self.auto_class.from_pretrained(tmp_path)) is self.model_class

    def test_load_by_repo_id_from_offline_hub_cache(self, tmp_path: Path, monkeypatch) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = self.build()
        model.save_pretrained(tmp_path / "saved")
        cache = tmp_path / "hub"
        add_to_hub_cache(tmp_path / "saved", "medfm-test/tiny-model", cache)
        reloaded = self.auto_class.from_pretrained("medfm-test/tiny-model", cache_dir=cache).eval()
        inputs = self.make_inputs()
        assert_outputs_close(self.run(model, inputs), self.run(reloaded, inputs), atol=0, rtol=0)

    def test_eager_and_sdpa_agree(self, tmp_path: Path) -> None:
        model = self.build()
        model.save_pretrained(tmp_path)
        inputs = self.make_inputs()
        eager = self.model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert eager.config._attn_implementation == "eager"  # the switch really applies
        outputs = [self.run(eager, inputs)]
        if getattr(self.model_class, "_supports_sdpa", False):
            sdpa = self.model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
            assert sdpa.config._attn_implementation == "sdpa"
            outputs.append(self.run(sdpa, inputs))
            assert_outputs_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)

    def test_gradient_checkpointing_gives_the_same_gradients(self) -> None:
        if not self.supports_checkpointing:
            pytest.skip(
                f"{self.model_class.__name__} has no activation checkpointing (no transformer blocks)"
            )
        inputs = self.make_inputs()
        gradients = []
        for checkpointing in (False, True):
            model = self.build().train()
            if checkpointing:
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
                assert model.is_activation_checkpointing
            loss = sum(t.float().pow(2).mean() for t in _float_tensors(model(**inputs)))
            loss.backward()
            gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert gradients[0].keys() == gradients[1].keys() and gradients[0]
        for name in gradients[0]:
            torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-6, rtol=1e-5, msg=name)

    def test_batch_equals_single_samples(self) -> None:
        model = self.build()
        inputs = self.make_inputs(batch_size=2)
        batched = _float_tensors(self.run(model, inputs))
        for index in range(2):
            single = _float_tensors(self.run(model, self.select(inputs, index)))
            for whole, one in zip(batched, single):
                if whole.ndim == 0 or whole.shape[0] != 2:
                    continue  # batch reductions (a loss) or per-token rows (MIM logits) are checked elsewhere
                torch.testing.assert_close(whole[index : index + 1], one, atol=1e-5, rtol=1e-4)

    def test_bfloat16_forward(self) -> None:
        model = self.build().to(torch.bfloat16)
        inputs = {
            k: v.to(torch.bfloat16)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "spacing"
            else v
            for k, v in self.make_inputs().items()
        }
        outputs = _float_tensors(self.run(model, inputs))
        assert outputs and all(torch.isfinite(t.float()).all() for t in outputs)
        assert any(t.dtype == torch.bfloat16 for t in outputs)

    def test_two_d_input(self) -> None:
        if not self.supports_2d:
            pytest.skip(f"{self.model_class.__name__} takes 3D inputs only")
        model = self.build()
        outputs = _float_tensors(self.run(model, self.make_inputs(two_d=True)))
        assert outputs and all(torch.isfinite(t).all() for t in outputs)

    def test_model_contract(self) -> None:
        model = self.build()
        assert isinstance(model, MedfmModelMixin)
        assert model.accepts_spacing == ("spacing" in inspect.signature(model.forward).parameters)
        assert model.pooling in ("cls", "mean") and model.num_prefix_tokens == (model.pooling == "cls")
        assert set(model.input_spatial_dims) <= {2, 3} and (
            self.supports_2d == (2 in model.input_spatial_dims)
        )
        inputs = self.make_inputs()
        spacing = inputs.get("spacing")
        multiple = model.required_input_multiple(spacing)
        assert len(multiple) == 3 and all(int(m) >= 1 for m in multiple)
        shape = inputs["pixel_values"].shape[2:]
        assert all(n % m == 0 for n, m in zip(shape, multiple)), (shape, multiple)
        assert all(n >= low for n, low in zip(shape, model.minimum_input_shape(spacing)))
        assert model.num_input_channels == inputs["pixel_values"].shape[1]
        outputs = self.run(model, inputs)
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None:  # a backbone: pooler_output follows the stated pooling
            from medfm.layers.heads import pool_tokens

            if model.pooling == "cls":
                torch.testing.assert_close(pooled, pool_tokens(outputs.last_hidden_state, "cls", 1))

    def test_every_parameter_is_used(self) -> None:
        """Each parameter gets a gradient from the model's own outputs (loss included when it has one)."""
        model = self.build().train()
        outputs = model(**self.make_inputs())
        loss = sum(t.float().pow(2).mean() for t in _float_tensors(outputs))
        loss.backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{self.model_class.__name__} holds parameters its forward never uses: {unused}"
