"""examples/pretrain_mim.py: the loss falls, the backbone loads, resume is exact, two processes agree."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
from transformers import AutoModel

import medfm  # noqa: F401
from medfm.models.spad import SpadViTModel

from ..conftest import NIBABEL_DATA
from . import EXAMPLES, load_example

SCRIPT = EXAMPLES / "pretrain_mim.py"
TINY = [
    "--crop-size",
    "32",
    "--depth-tokens",
    "2",
    "--batch-size",
    "2",
    "--lr",
    "1e-3",
    "--warmup-steps",
    "20",
    "--config",
    json.dumps(
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 85,
            "pos_embed_shape": [2, 3, 3],
        }
    ),
    "--tokenizer-config",
    json.dumps(
        {
            "downsample_channels": [8, 8, 16],
            "upsample_channels": [8, 8, 16],
            "codebook_size": 32,
            "embedding_dim": 16,
        }
    ),
]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory, mni_t1_path: Path) -> Path:
    """Volumes nibabel and nilearn ship, at three spacings, plus a corrupt file."""
    data = tmp_path_factory.mktemp("volumes")
    for name in ("anatomical.nii", "resampled_anat_moved.nii", "reoriented_anat_moved.nii"):
        shutil.copy(NIBABEL_DATA / name, data / name)
    shutil.copy(mni_t1_path, data / "mni152_t1.nii.gz")
    (data / "corrupt.nii.gz").write_bytes(mni_t1_path.read_bytes()[:4000])
    return data


@pytest.mark.slow
def test_loss_falls_and_backbone_loads(volumes: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"skipping .*corrupt\.nii\.gz"):
        losses = load_example("pretrain_mim").main(
            [
                "--data",
                str(volumes),
                "--output",
                str(tmp_path / "run"),
                "--steps",
                "300",
                "--save-every",
                "100",
                "--keep-last",
                "2",
                *TINY,
            ]
        )
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.4, (first, last)  # about 3.44 -> 2.67
    backbone = AutoModel.from_pretrained(tmp_path / "run" / "model")
    assert type(backbone) is SpadViTModel
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000200",
        "step-00000300",
    ]  # three saved atomically, pruned to --keep-last 2
    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines[1:]]
    assert {"loss", "lr", "samples_per_s", "tokens_per_s"} <= set(logged[-1]) and logged[-1]["step"] == 300


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(volumes: Path, tmp_path: Path) -> None:
    """Interrupted at step 6 (checkpoints every 4), resumed from step 4: steps 5-10 match bit for bit.

    Warm-up (3) is shorter than the run, so a wrong schedule would show; micro-batches are accumulated (2) and
    loaded by two workers, so a wrong data position would show.
    """
    example = load_example("pretrain_mim")
    common = [
        "--data",
        str(volumes),
        "--steps",
        "10",
        "--save-every",
        "4",
        *TINY,
        "--warmup-steps",
        "3",
        "--accumulation-steps",
        "2",
        "--num-workers",
        "2",
    ]
    whole = example.main([*common, "--output", str(tmp_path / "whole")])
    example.main([*common, "--output", str(tmp_path / "parts"), "--stop-after", "6"])
    resumed_file = tmp_path / "resumed.json"
    example.main(
        [
            *common,
            "--output",
            str(tmp_path / "parts"),
            "--resume_from_checkpoint",
            "latest",
            "--losses-file",
            str(resumed_file),
        ]
    )
    resumed = json.loads(resumed_file.read_text())
    assert resumed["first_step"] == 5
    assert resumed["losses"] == whole[4:]  # steps 5..10, bit for bit
    assert len(set(whole)) == len(whole)  # the losses do change from step to step


def test_empty_data_fails_before_building_a_model(tmp_path: Path) -> None:
    from medfm.errors import DatasetError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no NIfTI file"):
        load_example("pretrain_mim").main(
            ["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run"), *TINY]
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_hold_identical_weights_and_rank_zero_writes(volumes: Path, tmp_path: Path) -> None:
    from . import launch_on_two_cpu_processes

    arguments = [
        "--data",
        str(volumes),
        "--output",
        str(tmp_path / "run"),
        "--steps",
        "4",
        "--save-every",
        "2",
    ]
    arguments += ["--log-every", "1", "--weights-digest-dir", str(tmp_path / "digests"), *TINY]
    done = launch_on_two_cpu_processes(SCRIPT, arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = {p.name: p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert set(digests) == {"rank0.sha256", "rank1.sha256"}
    assert digests["rank0.sha256"] == digests["rank1.sha256"]  # DDP kept the replicas identical
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [
        "step-00000002",
        "step-00000004",
    ]  # no leftover temporary folders
    for checkpoint in checkpoints:
        files = sorted(p.name for p in checkpoint.iterdir())
        # The weights and optimizer (saved by rank 0) and each rank's own RNG state.
        assert {"model.safetensors", "optimizer.bin"} <= set(files)
        assert [f for f in files if f.startswith("random_states")] == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    # The schedule advances once per optimizer step, not once per process: in warm-up (20 steps) the
    # learning rate after step s is 1e-3 * (s + 1) / 20, as in a single process.
    lines = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()[1:]
    assert [round(json.loads(line)["lr"], 9) for line in lines] == [
        round(1e-3 * (s + 1) / 20, 9) for s in range(1, 5)
    ]


@pytest.mark.slow
def test_tokenizer_pretraining_then_mim_with_it(volumes: Path, tmp_path: Path) -> None:
    from medfm.models.spad import SpadVTModel

    tokenizer_config = json.loads(TINY[TINY.index("--tokenizer-config") + 1])
    with pytest.warns(UserWarning, match="corrupt"):
        losses = load_example("pretrain_tokenizer").main(
            [
                "--data",
                str(volumes),
                "--output",
                str(tmp_path / "vt"),
                "--steps",
                "150",
                "--crop-size",
                "32",
                "--depth-tokens",
                "2",
                "--lr",
                "2e-3",
                "--warmup-steps",
                "10",
                "--save-every",
                "0",
                "--config",
                json.dumps(tokenizer_config),
            ]
        )
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5  # about 4.15 -> 3.15
    tokenizer = AutoModel.from_pretrained(tmp_path / "vt" / "model")
    assert type(tokenizer) is SpadVTModel
    # The trained tokenizer gives the MIM targets.
    args = [a for a in TINY]
    position = args.index("--tokenizer-config")
    del args[position : position + 2]
    mim_losses = load_example("pretrain_mim").main(
        [
            "--data",
            str(volumes),
            "--output",
            str(tmp_path / "mim"),
            "--steps",
            "3",
            "--save-every",
            "0",
            "--tokenizer",
            str(tmp_path / "vt"),  # the run folder, as the README prints it
            *args,
        ]
    )
    assert len(mim_losses) == 3 and all(math.isfinite(x) for x in mim_losses)


# --- the options tell the truth (issue 11, item 9) ------------------------------------------------------------

TINY_VT = json.loads(TINY[TINY.index("--tokenizer-config") + 1])


def _without(arguments: list[str], option: str) -> list[str]:
    position = arguments.index(option)
    return arguments[:position] + arguments[position + 2 :]


@pytest.fixture(scope="module")
def tokenizer_layouts(tmp_path_factory) -> dict[str, Path]:
    """A tiny SPAD-VT saved where a tokenizer run and the converter put it."""
    from medfm.models.spad import SpadVTConfig, SpadVTModel

    root = tmp_path_factory.mktemp("tokenizers")
    tokenizer = SpadVTModel(SpadVTConfig(**TINY_VT))
    tokenizer.save_pretrained(root / "vt-run" / "model")  # examples/pretrain_tokenizer.py --output vt-run
    tokenizer.save_pretrained(root / "converted" / "tokenizer")  # convert_spad: MODEL/tokenizer
    (root / "converted" / "config.json").write_text(json.dumps({"model_type": "spad_vit"}))
    (root / "empty").mkdir()
    return {"run": root / "vt-run", "converted": root / "converted", "empty": root / "empty"}


def test_tokenizer_option_takes_a_run_folder_or_a_converted_model(tokenizer_layouts, tmp_path) -> None:
    from medfm.training.pretraining import PretrainingOptionError, resolve_tokenizer

    run, converted = tokenizer_layouts["run"], tokenizer_layouts["converted"]
    assert resolve_tokenizer(str(run), "spad_vt") == str(run / "model")
    assert resolve_tokenizer(str(run / "model"), "spad_vt") == str(run / "model")
    assert resolve_tokenizer(str(converted), "spad_vt") == str(converted / "tokenizer")
    assert resolve_tokenizer("org/spad-vt", "spad_vt") == "org/spad-vt"  # a Hub id passes through
    with pytest.raises(PretrainingOptionError, match=r"--tokenizer .*empty: expected a 'spad_vt' tokenizer"):
        resolve_tokenizer(str(tokenizer_layouts["empty"]), "spad_vt")
    with pytest.raises(PretrainingOptionError, match=r"no such folder"):
        resolve_tokenizer(str(tmp_path / "runs" / "spad-vt"), "spad_vt")


def test_mim_run_with_the_tokenizer_run_folder(tokenizer_layouts, anatomical_path: Path, tmp_path) -> None:
    """The README's command: --tokenizer names the tokenizer run's --output folder."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(anatomical_path, data / "anatomical.nii")
    arguments = ["--data", str(data), "--output", str(tmp_path / "mim"), "--steps", "1", "--save-every", "0"]
    arguments += ["--tokenizer", str(tokenizer_layouts["run"]), *_without(TINY, "--tokenizer-config")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = load_example("pretrain_mim").main([*arguments, "--warmup-steps", "0"])
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert not [w for w in caught if "random projection" in str(w.message)]
    saved = json.loads((tmp_path / "mim" / "model" / "tokenizer" / "config.json").read_text())
    assert saved["codebook_size"] == TINY_VT["codebook_size"] and saved["model_type"] == "spad_vt"


def test_each_script_has_its_own_help_and_every_option_shows_its_default(capsys) -> None:
    helps = {}
    for name in ("pretrain_mim", "pretrain_tokenizer"):
        with pytest.raises(SystemExit) as exit_info:
            load_example(name).main(["--help"])
        assert exit_info.value.code == 0
        helps[name] = capsys.readouterr().out
        # One block per option: its line and the help lines under it.
        options = re.split(r"\n(?=  -)", helps[name].split("options:")[1].strip("\n"))
        assert len(options) > 20
        for line in options:
            if line.startswith(("  -h", "  --data", "  --output")):  # help; the two required options
                continue
            assert "default" in " ".join(line.split()), line
    assert "Pre-train the SPAD-VT soft tokenizer" in helps["pretrain_tokenizer"]
    assert "Masked image modeling" in helps["pretrain_mim"]
    # The tokenizer options apply to MIM only.
    assert "--tokenizer " in helps["pretrain_mim"] and "--tokenizer-config" in helps["pretrain_mim"]
    assert "--tokenizer" not in helps["pretrain_tokenizer"].split("options:")[1]
    flat = {name: " ".join(text.split()) for name, text in helps.items()}
    assert "128 for spad-vt" in flat["pretrain_tokenizer"] and "160 for spad-vit" in flat["pretrain_mim"]


def test_tokenizer_training_refuses_tokenizer_options(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_example("pretrain_tokenizer").main(
            ["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --tokenizer" in capsys.readouterr().err


def test_random_targets_and_a_warm_up_longer_than_the_run_warn(tmp_path: Path) -> None:
    from medfm.errors import DatasetError

    (tmp_path / "empty").mkdir()
    arguments = ["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run"), *TINY, "--steps", "20"]
    with pytest.warns(UserWarning) as caught, pytest.raises(DatasetError):
        load_example("pretrain_mim").main(arguments)  # warm-up 20 of 20 steps, no --tokenizer
    messages = [str(w.message) for w in caught]
    assert any("no --tokenizer given" in m and "random projection" in m for m in messages), messages
    assert any("--warmup-steps 20 >= --steps 20" in m for m in messages), messages


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--config", "{hidden_size: 32}"], r"--config '\{hidden_size: 32\}' is not valid JSON"),
        (["--config", "[1, 2]"], r"--config '\[1, 2\]' is a JSON list; expected a JSON object"),
        (["--tokenizer-config", "nope"], r"--tokenizer-config 'nope' is not valid JSON"),
        (["--model", "mae"], r"argument --model: invalid choice: 'mae'"),
        (["--crop-size", "30"], r"--crop-size 30 must be a positive multiple of 16, .* \(e\.g\. 16 or 32\)"),
        (["--crop-size", "8"], r"--crop-size 8 must be a positive multiple of 16, .* \(e\.g\. 16\)"),
        (["--slice-probability", "1.5"], r"--slice-probability 1\.5 must be in \[0, 1\]"),
        (["--steps", "0"], r"--steps 0 must be at least 1"),
        (["--tokenizer", "/no/such/tokenizer"], r"--tokenizer /no/such/tokenizer: no such folder"),
    ],
)
def test_bad_options_are_named_in_the_error(change: list[str], message: str, tmp_path, capsys) -> None:
    arguments = ["--data", str(tmp_path), "--output", str(tmp_path / "run"), *TINY, *change]
    with pytest.raises(SystemExit) as exit_info:
        load_example("pretrain_mim").main(arguments)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: " in error
    assert re.search(message, error), error
    assert "processor" not in error and "pad_to_multiple" not in error
    assert not (tmp_path / "run").exists()


def test_run_pretraining_checks_options_itself(tmp_path) -> None:
    """A caller that builds the namespace without the parser gets the same error, as an exception."""
    from medfm.training.pretraining import PretrainingOptionError, pretraining_parser, run_pretraining

    args = pretraining_parser("x", objective="spad-vit").parse_args(
        ["--data", str(tmp_path), "--output", str(tmp_path / "run")]
    )
    args.crop_size = 30
    with pytest.raises(PretrainingOptionError, match=r"--crop-size 30 must be a positive multiple of 16"):
        run_pretraining(args)
