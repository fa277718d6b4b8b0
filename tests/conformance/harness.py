"""Import transformers' own common model tests (from the release's sdist, cached) for medfm's models.

A family's conformance file defines a model tester (tiny config + inputs, as transformers' per-model
tests do) and a ``unittest.TestCase`` that mixes :class:`MedfmModelTest` with ``ModelTesterMixin``.

The sdist lacks three modules the release files import; minimal stand-ins are registered in their place:
``exporters/test_export.py`` (``ExportTesterMixin``: the ``torch.export`` checks; medfm tests export in
its own regression tests), ``generation/test_utils.py`` (``GenerationTesterMixin``: medfm's models do
not generate) and ``utils/test_configuration_utils.py`` (``config_common_kwargs``: non-default values of
``PreTrainedConfig``'s own fields, which every config must accept and keep).
"""

from __future__ import annotations

import collections
import importlib
import sys
import types
from typing import Any

from torch import nn

from .fetch_transformers_tests import PACKAGE, release_tests_dir

__all__ = ["ConfigTester", "MedfmModelTest", "ModelTesterMixin", "floats_tensor"]


class ExportTesterMixin:
    """Stand-in for the release's ``ExportTesterMixin`` (not shipped in the sdist): adds no tests."""


class GenerationTesterMixin:
    """Stand-in for the release's ``GenerationTesterMixin`` (not shipped in the sdist): adds no tests."""


def _config_common_kwargs() -> dict[str, Any]:
    """Non-default values for the fields every ``PreTrainedConfig`` has (ConfigTester checks they stick)."""
    return {
        "return_dict": False,
        "output_hidden_states": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "architectures": ["MedfmConformanceModel"],
        "id2label": {0: "background", 1: "organ", 2: "lesion"},
        "label2id": {"background": 0, "organ": 1, "lesion": 2},
        "problem_type": "single_label_classification",
    }


def _register(name: str, **attributes: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _load_release_modules() -> tuple[types.ModuleType, types.ModuleType]:
    folder = str(release_tests_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    _register(f"{PACKAGE}.exporters")
    _register(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _register(f"{PACKAGE}.generation")
    _register(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _register(f"{PACKAGE}.utils")
    _register(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=_config_common_kwargs())
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration


_modeling, _configuration = _load_release_modules()
ModelTesterMixin = _modeling.ModelTesterMixin
ConfigTester = _configuration.ConfigTester
floats_tensor = _modeling.floats_tensor
# The release tests recognise a base model (no head, no loss: skipped by the training tests, used by the
# base-model-only tests) by its class name in MODEL_MAPPING_NAMES. medfm's base models are registered in a
# copy held by the release module only, so transformers' own auto mappings are left untouched.
_modeling.MODEL_MAPPING_NAMES = collections.OrderedDict(_modeling.MODEL_MAPPING_NAMES)


def register_base_model(model_class: type) -> None:
    """Let the release tests treat ``model_class`` as the base model of its ``model_type``."""
    _modeling.MODEL_MAPPING_NAMES[model_class.config_class.model_type] = model_class.__name__


class MedfmModelTest:
    """What every medfm family's conformance ``TestCase`` shares.

    Subclasses set ``all_model_classes``, ``base_model_classes`` (those without a head), ``config_class``
    and build ``self.model_tester`` in ``setUp`` (then call ``super().setUp()``). The tester provides
    ``get_config()``, ``prepare_config_and_inputs_for_common()``, ``labels_for(model_class, inputs)`` (the
    training targets of a head class: transformers' ``_prepare_for_class`` only knows its own classes'
    names, so they must be deterministic) and optionally ``complete_inputs(model_class, inputs)`` (inputs a
    class needs besides the common ones, e.g. a fixed mask instead of a random one). Overrides shared by all
    medfm models live here, each with the reason it holds for a vision model.
    """

    config_class: type
    base_model_classes: tuple[type, ...] = ()
    config_tester_kwargs: dict[str, Any] = {}
    # Pixel inputs, no token vocabulary: nothing to resize (as transformers' vision models set).
    test_resize_embeddings = False
    # The release runs this init check only for models whose file has a "# Copyright 2023+" header; medfm's
    # files have none, so opt in explicitly.
    test_can_init_all_missing_weights_before_2023 = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for model_class in cls.base_model_classes:
            register_base_model(model_class)

    def setUp(self) -> None:
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False, **self.config_tester_kwargs
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        complete = getattr(self.model_tester, "complete_inputs", None)
        if complete is not None:
            inputs_dict = complete(model_class, inputs_dict)
        if return_labels:
            inputs_dict.update(self.model_tester.labels_for(model_class, inputs_dict))
        return inputs_dict

    def test_model_get_set_embeddings(self) -> None:
        # A vision model's input embedding is its patch embedding (a conv), not an nn.Embedding; it has no
        # output vocabulary. The same check transformers' own vision model tests make.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, nn.Linear))
