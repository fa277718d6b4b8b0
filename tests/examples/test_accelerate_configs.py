"""The ready-made Accelerate configs parse as Accelerate configs and say what they are for."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs"
EXPECTED = {
    "single_gpu.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "multi_node_ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses(name: str) -> None:
    config = load_config_from_file(str(FOLDER / name))
    assert str(config.distributed_type).endswith(EXPECTED[name])
    if name == "multi_node_ddp.yaml":
        assert config.num_machines == 2
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero2.yaml":
        assert config.deepspeed_config["zero_stage"] == 2
    assert (FOLDER / name).read_text().startswith("#")  # each says what it is for
