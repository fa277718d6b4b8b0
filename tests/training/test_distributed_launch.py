"""The loop and multi-process launches: DeepSpeed gets its micro-batch size, lone processes are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medfm.errors import DistributedLaunchError
from medfm.training.loop import TrainingConfig, _check_process_group, _configure_deepspeed


def _accelerator(settings: dict, processes: int = 2) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=settings)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def test_deepspeed_gets_the_micro_batch_size_the_loop_cannot_pass_as_a_dataloader() -> None:
    settings = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    _configure_deepspeed(_accelerator(settings), TrainingConfig(micro_batch_size=3, accumulation_steps=4))
    # DeepSpeed asserts train_batch_size == micro * accumulation * world size.
    assert settings == {"train_micro_batch_size_per_gpu": 3, "train_batch_size": 3 * 4 * 2}


def test_deepspeed_settings_given_in_its_config_are_kept() -> None:
    settings = {"train_micro_batch_size_per_gpu": 5, "train_batch_size": 10}
    _configure_deepspeed(_accelerator(settings), TrainingConfig(micro_batch_size=3))
    assert settings == {"train_micro_batch_size_per_gpu": 5, "train_batch_size": 10}


def test_deepspeed_without_a_micro_batch_size_is_a_typed_error() -> None:
    with pytest.raises(DistributedLaunchError, match="micro-batch size"):
        _configure_deepspeed(_accelerator({"train_micro_batch_size_per_gpu": "auto"}), TrainingConfig())


def test_no_plugin_no_change() -> None:
    accelerator = SimpleNamespace(state=SimpleNamespace(), num_processes=1)
    _configure_deepspeed(accelerator, TrainingConfig())  # nothing to do, nothing raised


def test_processes_that_do_not_see_each_other_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `accelerate launch --num_processes 2` with a GPU config gives on a machine without GPUs: the
    # launcher sets WORLD_SIZE=2 but Accelerate builds no process group, so each process would train alone.
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, distributed_type="NO")
    with pytest.raises(DistributedLaunchError, match="use_cpu: true"):
        _check_process_group(alone)
    _check_process_group(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_process_group(alone)
