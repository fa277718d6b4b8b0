"""What every family's converter shares: building its config from inferred values and user overrides.

A converter infers a config from tensor shapes and takes from the user only what shapes cannot tell
(``--config``). Unknown fields are refused rather than written into ``config.json``, and a value the config
rejects is reported as a ``ValueError`` naming the field, never as a validation traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["build_config", "check_config_fields"]

# Accepted by every transformers config although they are properties, not dataclass fields.
_COMMON_KEYWORDS = frozenset({"num_labels", "output_attentions", "attn_implementation"})


def check_config_fields(config_class: type, values: dict[str, Any], source: str = "--config") -> None:
    """Refuse keys that are not fields of ``config_class``.

    Raises:
        ValueError: Naming the unknown keys and the known ones.
    """
    known = {field.name for field in dataclasses.fields(config_class)} | _COMMON_KEYWORDS
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{source}: {unknown} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
            f"{config_class.__name__}; known fields: {sorted(known - {'transformers_version', 'architectures'})}"
        )


def build_config(config_class: type, values: dict[str, Any]) -> Any:
    """``config_class(**values)``, its validation errors turned into one ``ValueError`` naming the problem.

    Raises:
        ValueError: The config rejects a value (a wrong type, heads that do not divide the width...).
    """
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_class(**values)
    except StrictDataclassError as error:
        cause = error.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else " ".join(str(error).split())
        raise ValueError(f"invalid {config_class.__name__} ({reason})") from None
