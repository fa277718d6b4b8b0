"""Resume skips a damaged checkpoint (issue 12, item 10): ``latest`` falls back past a ``step-*`` folder that is
incomplete or unreadable, with a warning naming it, and ``metrics.jsonl`` holds each step once after a resume.
The damaged checkpoints are made at test time from a real run."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from medfm.training import TrainingConfig, latest_checkpoint, train
from medfm.training.loop import checkpoint_problem


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, pixel_values, labels):
        loss = ((self.linear(pixel_values) - labels) ** 2).mean()
        return SemanticSegmenterOutput(loss=loss)


def _batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(2, 4, generator=generator)
        yield {"pixel_values": x, "labels": x.sum(1, keepdim=True)}


def _config(output: Path, **kwargs) -> TrainingConfig:
    settings = dict(steps=6, warmup_steps=1, output_dir=str(output), save_every=2, keep_last=3, log_every=1)
    return TrainingConfig(**{**settings, **kwargs})


def _run(output: Path, **kwargs):
    torch.manual_seed(0)
    return train(_Tiny(), _batches(), _config(output, **kwargs))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run stopped after step 6 with checkpoints at steps 2, 4 and 6."""
    output = tmp_path / "run"
    _run(output)
    names = sorted(p.name for p in (output / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    return output


def _damage_weights_missing(folder: Path) -> None:
    for path in folder.glob("model*"):
        path.unlink()


def _damage_optimizer_missing(folder: Path) -> None:
    for path in folder.glob("optimizer*"):
        path.unlink()


def _damage_loop_state_missing(folder: Path) -> None:
    for path in folder.glob("custom_checkpoint_*"):
        path.unlink()


def _damage_truncated_weights(folder: Path) -> None:
    (path,) = folder.glob("model*.safetensors")
    path.write_bytes(path.read_bytes()[:-7])


def _damage_truncated_optimizer(folder: Path) -> None:
    (path,) = folder.glob("optimizer*.bin")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_empty_weights(folder: Path) -> None:
    (path,) = folder.glob("model*.safetensors")
    path.write_bytes(b"")


def _damage_garbage_header(folder: Path) -> None:
    (path,) = folder.glob("model*.safetensors")
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 32)


def _damage_emptied_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


DAMAGES = {
    "model weights missing": (_damage_weights_missing, "no model weights"),
    "optimizer state missing": (_damage_optimizer_missing, "no optimizer state"),
    "loop state missing": (_damage_loop_state_missing, "no training-loop state"),
    "truncated safetensors": (_damage_truncated_weights, "truncated"),
    "truncated optimizer archive": (_damage_truncated_optimizer, "truncated"),
    "empty weights file": (_damage_empty_weights, "empty"),
    "unparsable safetensors header": (_damage_garbage_header, "unreadable"),
    "empty step folder": (_damage_emptied_folder, "no model weights"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_latest_falls_back_past_a_damaged_checkpoint(run: Path, case: str) -> None:
    damage, phrase = DAMAGES[case]
    newest = run / "checkpoints" / "step-00000006"
    damage(newest)
    assert phrase in checkpoint_problem(newest)
    with pytest.warns(UserWarning, match=rf"step-00000006.*{phrase}"):
        assert latest_checkpoint(run) == run / "checkpoints" / "step-00000004"


def test_complete_checkpoints_have_no_problem(run: Path) -> None:
    for folder in (run / "checkpoints").glob("step-*"):
        assert checkpoint_problem(folder) is None


def test_all_damaged_means_nothing_to_resume(run: Path) -> None:
    for folder in (run / "checkpoints").glob("step-*"):
        _damage_weights_missing(folder)
    with pytest.warns(UserWarning):
        assert latest_checkpoint(run) is None
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _run(run, steps=8, resume_from="latest")


def _logged_steps(output: Path) -> list[int]:
    lines = (output / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "step" in json.loads(line)]


def test_resume_past_a_damaged_checkpoint_continues_from_the_older_one(run: Path) -> None:
    _damage_truncated_weights(run / "checkpoints" / "step-00000006")
    with pytest.warns(UserWarning, match="step-00000006"):
        history = _run(run, steps=8, resume_from="latest")
    assert history.first_step == 5 and len(history.losses) == 4  # steps 5..8, from step 4's checkpoint
    assert _logged_steps(run) == list(range(1, 9))  # steps 5 and 6 are logged once, not twice


def test_a_checkpoint_that_fails_to_load_falls_back_too(run: Path) -> None:
    """A fault the static check cannot see (a zip archive that is not a torch state) is caught when loading."""
    (path,) = (run / "checkpoints" / "step-00000006").glob("custom_checkpoint_0.pkl")
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("junk.txt", "not a torch state")
    assert checkpoint_problem(path.parent) is None
    with pytest.warns(UserWarning, match="step-00000006.*cannot be loaded"):
        history = _run(run, steps=8, resume_from="latest")
    assert history.first_step == 5


def test_metrics_have_no_duplicated_steps_after_resume(tmp_path: Path) -> None:
    """Steps logged after the last checkpoint (a run killed between checkpoints) are dropped on resume."""
    output = tmp_path / "run"
    _run(output, steps=8, stop_after=5)  # checkpoints at 2 and 4; steps 1..5 logged
    assert _logged_steps(output) == [1, 2, 3, 4, 5]
    with (output / "logs" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "loss": 0.')  # a line cut short by the kill
    _run(output, steps=8, resume_from="latest")
    steps = _logged_steps(output)
    assert steps == list(range(1, 9)) and len(steps) == len(set(steps))


def test_an_explicit_damaged_checkpoint_is_not_skipped(run: Path) -> None:
    """Only ``latest`` falls back; a folder named explicitly that fails to load raises."""
    folder = run / "checkpoints" / "step-00000006"
    _damage_weights_missing(folder)
    with pytest.raises(Exception):  # noqa: B017 - whatever Accelerate raises for a missing weights file
        _run(run, steps=8, resume_from=str(folder))
