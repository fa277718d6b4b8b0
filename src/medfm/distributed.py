"""What medfm's multi-process entry points (the training loop, the folder segmentation job) share: how many
processes a launch started, and the refusal of a launch whose processes do not see each other."""

from __future__ import annotations

import os

from .errors import DistributedLaunchError

__all__ = ["check_processes_joined", "launched_processes"]


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, which ``accelerate launch`` and ``torchrun``
    set; 1 when it is unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_processes_joined(seen: int, distributed_type: object, then: str) -> None:
    """Refuse a launch of several processes of which Accelerate sees fewer: each would run alone, as the main
    process.

    Args:
        seen: The processes Accelerate sees (``num_processes`` of its state).
        distributed_type: Accelerate's distributed type, named in the message.
        then: The rest of the message after the statement: the consequence and what to do.

    Raises:
        DistributedLaunchError: ``WORLD_SIZE`` > 1 and ``seen`` differs from it.
    """
    launched = launched_processes()
    if launched > 1 and seen != launched:
        raise DistributedLaunchError(
            f"{launched} processes were launched but each runs alone (Accelerate sees {seen}, distributed type "
            f"{distributed_type}){then}"
        )
