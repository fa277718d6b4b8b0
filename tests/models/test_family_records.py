"""Adding a family is adding its record: a throwaway family registered at run time is found by the CLI's
``convert``, the objectives table, the PEFT presets, the Auto classes and ``pipeline(...)``, and the shipped
families' records are complete."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PretrainedConfig,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

import medfm
from medfm import cli
from medfm.models.family import ModelFamily, PeftPreset
from medfm.models.modeling_utils import MedfmPreTrainedModel
from medfm.models.registry import FAMILY_MODULES, families, family_named, family_of, register_family
from medfm.peft import lora_config
from medfm.processing import MedicalImageProcessor
from medfm.training.objectives import OBJECTIVES, PretrainingObjective, build_objective

# --- a throwaway family: a mean-pooled linear "backbone" over voxels, and a classifier on it -------------


class ToyConfig(PretrainedConfig):
    model_type = "medfm_toy_family"

    def __init__(self, in_channels: int = 1, hidden_size: int = 8, **kwargs):
        self.in_channels, self.hidden_size = in_channels, hidden_size
        super().__init__(**kwargs)


class ToyPreTrainedModel(MedfmPreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"
    main_input_name = "pixel_values"
    pooling = "mean"

    def required_input_multiple(self, spacing=None):
        return (1, 2, 2)

    def _init_weights(self, module):
        pass


class ToyModel(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Linear(config.in_channels, config.hidden_size)
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        tokens = self.embed(pixel_values.flatten(2).transpose(1, 2))
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1))


class ToyForImageClassification(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.toy = ToyModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, **kwargs):
        return ImageClassifierOutput(logits=self.classifier(self.toy(pixel_values).pooler_output))


class ToyObjective(PretrainingObjective):
    @classmethod
    def build(cls, model, tokenizer, config, tokenizer_config):
        return cls()


@dataclass
class _Calls:
    converted: list


CALLS = _Calls([])


def toy_converter(checkpoint, output, *, config_overrides, trust_checkpoint, flavour=None):
    CALLS.converted.append((checkpoint, output, flavour))
    return output


TOY = ModelFamily(
    name="toyfamily",
    title="A throwaway family (tests only)",
    configs={ToyConfig: {AutoModel: ToyModel, AutoModelForImageClassification: ToyForImageClassification}},
    converter=f"{__name__}:toy_converter",
    converter_options=(),
    objectives={"toy-objective": f"{__name__}:ToyObjective"},
    peft={
        ToyModel: PeftPreset(r".*embed"),
        ToyForImageClassification: PeftPreset(r".*embed", ("classifier",)),
    },
)


@pytest.fixture(scope="module")
def toy_family():
    register_family(TOY)
    return TOY


def test_a_registered_family_reaches_every_entry_point(toy_family, tmp_path, capsys) -> None:
    # The CLI: `medfm convert --help` lists it and `medfm convert toyfamily` calls its converter.
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    assert "toyfamily" in capsys.readouterr().out
    assert cli.main(["convert", "toyfamily", "--checkpoint", "x.pth", "--output", str(tmp_path)]) == 0
    assert CALLS.converted[-1][1] == str(tmp_path)
    # Options of another family's converter are refused for this one.
    assert cli.main(["convert", "toyfamily", "--checkpoint", "x", "--output", "y", "--tokenizer", "t"]) == 2

    # Objectives, PEFT presets and the family lookup, by class.
    assert "toy-objective" in OBJECTIVES and isinstance(build_objective("toy-objective", model=None,
        tokenizer=None, config={}, tokenizer_config={}), ToyObjective)  # fmt: skip
    classifier = ToyForImageClassification(ToyConfig(num_labels=3))
    settings = lora_config(classifier, r=2)
    assert settings.target_modules == r".*embed" and list(settings.modules_to_save) == ["classifier"]
    assert family_of(classifier) is toy_family and family_named("toyfamily") is toy_family

    # The Auto classes and a pipeline, from a saved folder.
    classifier.save_pretrained(tmp_path / "toy")
    MedicalImageProcessor(steps=[{"name": "minmax"}]).save_pretrained(tmp_path / "toy")
    assert (
        type(AutoModelForImageClassification.from_pretrained(tmp_path / "toy")) is ToyForImageClassification
    )
    assert type(AutoConfig.from_pretrained(tmp_path / "toy")) is ToyConfig
    scores = pipeline("medical-image-classification", model=str(tmp_path / "toy"))(
        torch.rand(6, 8, 8).numpy(), spacing=(1.0, 1.0, 1.0)
    )
    assert len(scores) == 3 and abs(sum(s["score"] for s in scores) - 1) < 1e-5
    features = pipeline("medical-feature-extraction", model=str(tmp_path / "toy"))(
        torch.rand(6, 8, 8).numpy(), spacing=(1.0, 1.0, 1.0), return_tokens=True
    )
    assert features["tokens"].shape == (6 * 8 * 8, 8)  # mean pooling: no prefix token is dropped


def test_shipped_records_are_complete() -> None:
    assert [f.name for f in families()][: len(FAMILY_MODULES)] == [
        m.rsplit(".", 1)[-1] for m in FAMILY_MODULES
    ]
    for family in families():
        if family is TOY:
            continue
        assert family.load_converter() is not None
        for name in family.objectives:
            assert issubclass(OBJECTIVES[name], PretrainingObjective)
        for model_class in family.model_classes:
            assert issubclass(model_class, MedfmPreTrainedModel), model_class
            assert family_of(model_class) is family
        assert set(family.presets) <= set(_preset_names())


def _preset_names() -> list[str]:
    from medfm.processing import list_presets

    return [preset.name for preset in list_presets()]


def test_no_file_outside_a_family_folder_names_its_classes() -> None:
    """The layering promise of the records: in the package, the examples and the conversion scripts, only
    models/<family>/ names a family's classes (tests and benchmarks measure given models on purpose)."""
    from pathlib import Path

    root = Path(medfm.__file__).parent
    project = root.parents[1]
    for family in families():
        if family is TOY:
            continue
        names = {cls.__name__ for cls in (*family.model_classes, *family.configs)}
        folder = root / "models" / family.name
        sources = [
            *root.rglob("*.py"),
            *(project / "examples").rglob("*.py"),
            *(project / "conversion").glob("*.py"),
        ]
        for path in sources:
            if folder in path.parents:
                continue
            text = path.read_text()
            named = sorted(n for n in names if n in text)
            assert not named, f"{path.relative_to(project)} names {named} of the {family.name} family"


def test_conversion_script_is_the_cli() -> None:
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "conversion" / "convert_spad_original_to_hf.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--tokenizer" in result.stdout
