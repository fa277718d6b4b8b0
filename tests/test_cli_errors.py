"""The CLI's error contract: every failure exits 2 with one line on stderr naming the input, no traceback, and
nothing written; ``--debug`` shows the traceback. Also the task check (:mod:`medfm.tasks`) it relies on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medfm.cli import main
from medfm.errors import WrongTaskError
from medfm.tasks import check_task, model_task

from .common.tiny_models import TINY_VIT, save_tiny_segmentation_model


def _processor():
    from medfm.processing import MedicalImageProcessor

    return MedicalImageProcessor(
        steps=[{"name": "minmax"}, {"name": "repeat_channels"}, {"name": "pad_to_multiple", "multiple": 16}]
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny model folders of every kind: seg, cls, backbone, mim, a LoRA adapter of seg and broken ones."""
    from peft import get_peft_model

    import medfm.peft
    from medfm.models.spad import (
        SpadViTConfig,
        SpadViTForImageClassification,
        SpadViTForMaskedImageModeling,
        SpadViTForSemanticSegmentation,
        SpadViTModel,
    )

    root = tmp_path_factory.mktemp("models")
    save_tiny_segmentation_model(root / "seg")
    torch.manual_seed(0)
    config = SpadViTConfig(**TINY_VIT, num_labels=2, id2label={0: "a", 1: "b"})
    for name, cls in {
        "cls": SpadViTForImageClassification,
        "backbone": SpadViTModel,
        "mim": SpadViTForMaskedImageModeling,
    }.items():
        cls(config).save_pretrained(root / name)
        _processor().save_pretrained(root / name)
    seg = SpadViTForSemanticSegmentation.from_pretrained(root / "seg")
    get_peft_model(seg, medfm.peft.lora_config(seg, r=2)).save_pretrained(root / "lora")
    orphan = root / "lora-orphan"
    shutil.copytree(root / "lora", orphan)
    adapter = json.loads((orphan / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(root / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(adapter))
    if hasattr(medfm.peft, "save_adapter"):  # self-contained adapter folders (config.json + adapter)
        from transformers import AutoModelForSemanticSegmentation

        for name in ("adapter", "adapter-orphan"):
            shutil.copytree(root / "seg", root / f"{name}-base")
            seg = SpadViTForSemanticSegmentation.from_pretrained(root / f"{name}-base")
            medfm.peft.save_adapter(
                get_peft_model(seg, medfm.peft.lora_config(seg, r=2)),
                root / name,
                base_model=str(root / f"{name}-base"),
                auto_class=AutoModelForSemanticSegmentation,
            )
            _processor().save_pretrained(root / name)
        shutil.rmtree(root / "adapter-orphan-base")
    (root / "no-processor").mkdir()
    shutil.copy(root / "cls" / "config.json", root / "no-processor")
    shutil.copy(root / "cls" / "model.safetensors", root / "no-processor")
    (root / "empty").mkdir()
    return root


#: id -> (command with {file} {models} {out}, texts stderr must hold, CUDA devices to pretend (None: real)).
BAD_INPUTS = {
    "cuda on a CPU-only machine": (
        "classify {file} --model {models}/cls --device cuda",
        ["--device cuda", "no cuda device", "--device cpu"],
        0,
    ),
    "cuda:7 on a one-GPU machine": (
        "segment {file} --model {models}/seg --out {out}/s.nii.gz --device cuda:7",
        ["--device cuda:7", "1 cuda device", "cuda:0"],
        1,
    ),
    "GPU number on a CPU-only machine": (
        "classify {file} --model {models}/cls --device 1",
        ["--device 1"],
        0,
    ),
    "mps elsewhere than a Mac": ("classify {file} --model {models}/cls --device mps", ["--device mps"], None),
    "device typo": ("segment {file} --model {models}/seg --out {out}/s.nii.gz --device cdua", ["cdua"], None),
    "segmentation model to classify": (
        "classify {file} --model {models}/seg",
        ["/seg:", "segmentation model", "medfm segment"],
        None,
    ),
    "classifier to segment": (
        "segment {file} --model {models}/cls --out {out}/s.nii.gz",
        ["/cls:", "image classifier", "medfm classify"],
        None,
    ),
    "backbone to segment": (
        "segment {file} --model {models}/backbone --out {out}/s.nii.gz",
        ["/backbone:", "no task head", "finetune_segmentation"],
        None,
    ),
    "pre-trained model to classify": (
        "classify {file} --model {models}/mim --json",
        ["/mim:", "no task head", "finetune_classification"],
        None,
    ),
    "segmentation adapter to classify": (
        "classify {file} --model {models}/lora",
        ["/lora:", "segmentation model"],
        None,
    ),
    "adapter whose base model is gone": (
        "segment {file} --model {models}/lora-orphan --out {out}/s.nii.gz",
        ["/lora-orphan:", "deleted-base", "base_model_name_or_path"],
        None,
    ),
    "self-contained segmentation adapter to classify": (
        "classify {file} --model {models}/adapter",
        ["/adapter:", "segmentation model"],
        None,
    ),
    "self-contained adapter whose base model is gone": (
        "segment {file} --model {models}/adapter-orphan --out {out}/s.nii.gz",
        ["/adapter-orphan:", "adapter-orphan-base", "not there"],
        None,
    ),
    "adapter as a processor": (
        "preprocess {file} --config {models}/lora --out {out}/p.nii.gz",
        ["/lora:", "PEFT adapter", "--preset"],
        None,
    ),
    "missing model folder": (
        "segment {file} --model {models}/nope --out {out}/s.nii.gz",
        ["/nope:", "no such folder"],
        None,
    ),
    "missing relative model folder": (
        "classify {file} --model ./runs/x/final",
        ["./runs/x/final", "no such folder"],
        None,
    ),
    "Hub id neither cached nor reachable": (
        "classify {file} --model medfm-tests/no-such-model",
        ["medfm-tests/no-such-model", "no such folder", "Hub"],
        None,
    ),
    "weights file as model": (
        "classify {file} --model {models}/cls/model.safetensors",
        ["model.safetensors", "is a file"],
        None,
    ),
    "model folder without processor": (
        "classify {file} --model {models}/no-processor",
        ["/no-processor:", "preprocessor_config.json"],
        None,
    ),
    "folder that holds no model": (
        "segment {file} --model {models}/empty --out {out}/s.nii.gz",
        ["/empty:", "config.json"],
        None,
    ),
    "missing processor folder": (
        "preprocess {file} --config {models}/nope --out {out}/p.nii.gz",
        ["/nope:", "no such folder"],
        None,
    ),
    "missing input": (
        "segment {out}/missing.nii.gz --model {models}/seg --out {out}/s.nii.gz",
        ["missing.nii.gz"],
        None,
    ),
    "zero labels asked": ("classify {file} --model {models}/cls --top-k 0", ["--top-k 0"], None),
    "zero windows per forward pass": (
        "segment {file} --model {models}/seg --out {out}/s.nii.gz --sw-batch-size 0",
        ["--sw-batch-size 0"],
        None,
    ),
    "folder of cases with nothing to segment": (
        "segment {out} --model {models}/seg --out {out}/../labels",
        ["/out:", "no NIfTI files", "DICOM series"],
        None,
    ),
    "output folder inside the folder of cases": (
        "segment {out} --model {models}/seg --out {out}/labels",
        ["/out/labels:", "inside the input folder"],
        None,
    ),
    "negative worker count": (
        "segment {out} --model {models}/seg --out {out}/../labels --workers -1",
        ["--workers -1"],
        None,
    ),
    "missing option": ("classify {file}", ["--model", "--help"], None),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(
    case: str, models: Path, anatomical_path: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    command, phrases, cuda_devices = BAD_INPUTS[case]
    if "{models}/adapter" in command and not (models / "adapter").is_dir():
        pytest.skip("medfm.peft.save_adapter (self-contained adapters) is not there")
    if cuda_devices is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "out"
    out.mkdir()
    argv = command.format(file=anatomical_path, models=models, out=out).split()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert lines[0].startswith(f"medfm {argv[0]}: error: "), lines[0]
    assert list(out.iterdir()) == [], "a failed command wrote a file"


def test_debug_shows_the_traceback(models: Path, anatomical_path: Path, capsys) -> None:
    for argv in (
        ["--debug", "classify", str(anatomical_path), "--model", str(models / "seg")],
        ["classify", str(anatomical_path), "--model", str(models / "seg"), "--debug"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "WrongTaskError" in err


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys) -> None:
    """An exception the CLI did not foresee (a library's own) shows its type and first line, and how to see
    more."""
    import medfm.processing

    def broken(*args, **kwargs):
        raise RuntimeError("the first line\nand the rest of a long story")

    monkeypatch.setattr(medfm.processing, "list_presets", broken)
    assert main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err == "medfm presets: error: RuntimeError: the first line (run with --debug for the traceback)\n"


def test_broken_pipe_is_quiet() -> None:
    """`medfm presets -v | head -1`: the reader goes away; no BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "medfm.cli", "presets", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # before the child writes: its first flush meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait() == 2
    assert "Traceback" not in err and "BrokenPipeError" not in err and err == "", err


def test_classify_json(models: Path, anatomical_path: Path, capsys) -> None:
    assert (
        main(["classify", str(anatomical_path), "--model", str(models / "cls"), "--json", "--top-k", "2"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(row) for row in rows] == [["label", "score"]] * 2
    assert {row["label"] for row in rows} == {"a", "b"}
    assert sum(row["score"] for row in rows) == pytest.approx(1.0)


def test_segment_with_an_adapter_folder_still_works(
    models: Path, anatomical_path: Path, tmp_path: Path
) -> None:
    """The adapter checks refuse only what cannot work: a segmentation adapter segments."""
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(anatomical_path), "--model", str(models / "lora"), "--out", str(out)]) == 0
    assert out.is_file()


def test_check_task_on_models_configs_and_adapters(models: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoConfig

    import medfm.peft
    from medfm.models.spad import SpadViTForSemanticSegmentation

    expected = {
        "seg": "medical-segmentation",
        "cls": "medical-image-classification",
        "backbone": "medical-feature-extraction",
        "mim": "masked-image-modeling",
    }
    for folder, task in expected.items():
        config = AutoConfig.from_pretrained(models / folder)
        assert model_task(config) == task
        check_task(config, "medical-feature-extraction")  # every model holds a backbone
    seg_config = AutoConfig.from_pretrained(models / "seg")
    check_task(seg_config, "medical-segmentation")
    check_task(seg_config, "segmentation")
    with pytest.raises(WrongTaskError, match=r"^where: a segmentation model") as caught:
        check_task(seg_config, "medical-image-classification", source="where")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(WrongTaskError, match="no task head"):
        check_task(AutoConfig.from_pretrained(models / "mim"), "classification")
    # A model instance, also inside a PEFT wrapper, and a config with an architecture named beside it.
    model = SpadViTForSemanticSegmentation(seg_config)
    wrapped = get_peft_model(model, medfm.peft.lora_config(model, r=2))
    for item in (model, wrapped):
        assert model_task(item) == "medical-segmentation"
        with pytest.raises(WrongTaskError):
            check_task(item, "medical-image-classification")
    cls_config = AutoConfig.from_pretrained(models / "cls")
    with pytest.raises(WrongTaskError):
        check_task(cls_config, "medical-image-classification", architecture="SpadViTForSemanticSegmentation")
    # A PEFT adapter may record the task's Auto class rather than a model class.
    assert model_task(cls_config, "AutoModelForSemanticSegmentation") == "medical-segmentation"
    # What cannot be told passes; an unknown task is a caller's error.
    seg_config.architectures = None
    check_task(seg_config, "medical-image-classification")
    with pytest.raises(ValueError, match="unknown task"):
        check_task(cls_config, "detection")
