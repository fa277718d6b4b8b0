"""What every family's converter shares: reading original checkpoints, building the config, loading the
weights strictly, writing the output folder atomically, and adapting pre-trained tensors to a fine-tuning config
when ``from_pretrained`` loads them (:class:`LoadTimeAdaptation`, :func:`register_load_time_adaptation`).

A converter infers a config from tensor shapes and takes from the user only what shapes cannot tell
(``--config``). Unknown fields are refused rather than written into ``config.json``, and a value the config
rejects is reported as an :class:`~medfm.errors.InvalidConfigError` naming the field, never as a validation
traceback.

Output folders (:func:`atomic_output_folder`): a converter writes into a hidden temporary sibling of the output
folder and renames it into place only once everything is written, so a failure (a corrupt tokenizer checkpoint,
a full disk, an interrupt) leaves no half folder. The output path may not exist yet, be an empty folder, or be a
folder a previous medfm conversion wrote (it has ``conversion.json``), which is replaced. Anything else (a file,
a link, a non-empty folder without ``conversion.json``, a folder holding one of the inputs) is refused with a
typed error; user data is never deleted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..errors import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    MedfmError,
    NonFiniteWeightsError,
    OutputPathError,
    OutputWriteError,
    OverwriteInputError,
    UnsupportedFormatError,
    VolumeNotFoundError,
)

__all__ = [
    "CONVERSION_MARKER",
    "KeepAsSaved",
    "LoadTimeAdaptation",
    "atomic_output_folder",
    "build_config",
    "check_config_fields",
    "check_finite_weights",
    "check_output_folder",
    "load_original_state_dict",
    "load_state_dict_strict",
    "register_load_time_adaptation",
    "require_keys",
    "single_tensor",
]

#: The file every medfm conversion writes last; a folder holding it may be replaced by a new conversion.
CONVERSION_MARKER = "conversion.json"

# Accepted by every transformers config although they are properties, not dataclass fields.
_COMMON_KEYWORDS = frozenset({"num_labels", "output_attentions", "attn_implementation"})


# --- configs ---------------------------------------------------------------------------------------------


def check_config_fields(config_class: type, values: Any, source: str = "--config") -> None:
    """Refuse a ``values`` that is not a mapping, and keys that are not fields of ``config_class``.

    Raises:
        InvalidConfigError: Not a mapping, or naming the unknown keys and the known ones.
    """
    if not isinstance(values, Mapping):
        raise InvalidConfigError(
            f"{source} must be a JSON object of config fields; got {type(values).__name__} {values!r:.80}"
        )
    known = {field.name for field in dataclasses.fields(config_class)} | _COMMON_KEYWORDS
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidConfigError(
            f"{source}: {unknown} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
            f"{config_class.__name__}; known fields: {sorted(known - {'transformers_version', 'architectures'})}"
        )


def build_config(config_class: type, values: dict[str, Any], source: str | os.PathLike | None = None) -> Any:
    """``config_class(**values)``, its validation errors turned into one :class:`InvalidConfigError`.

    Args:
        config_class: The config class.
        values: Its fields.
        source: The input the values come from (a checkpoint), named in the error.

    Raises:
        InvalidConfigError: The config rejects a value (a wrong type, heads that do not divide the width...).
    """
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_class(**values)
    except (StrictDataclassError, InvalidConfigError, TypeError, ValueError) as error:
        cause = error.__cause__ if isinstance(error, StrictDataclassError) else error
        if isinstance(cause, MedfmError):
            reason = cause.reason
        elif cause is not None:
            reason = f"{type(cause).__name__}: {cause}"
        else:
            reason = " ".join(str(error).split())
        raise InvalidConfigError(f"invalid {config_class.__name__} ({reason})", source) from None


# --- reading original checkpoints -------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """Types a Lightning/Fabric checkpoint stores besides tensors, allowed for ``weights_only`` loading."""
    return [
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        collections.defaultdict,
        argparse.Namespace,
    ]


def load_original_state_dict(
    path: str | os.PathLike, trust_checkpoint: bool = False, *, require_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read the weights of an original (upstream) checkpoint.

    Accepts a Lightning checkpoint (``state_dict``), a Fabric checkpoint (``model``), or a plain state dict, as
    ``.ckpt``/``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)`` plus a few allowed types)
    or ``.safetensors``. A ``module.`` prefix (DDP) is stripped.

    Args:
        path: The file.
        trust_checkpoint: Allow full unpickling for a file you trust whose extra metadata needs types
            outside the allow-list. Never needed for the weights themselves.
        require_finite: Refuse NaN/Inf weights (:func:`check_finite_weights`).

    Raises:
        VolumeNotFoundError: No such file.
        UnsupportedFormatError: Unknown extension, or no state dict inside.
        CorruptFileError: The file cannot be read (truncated; the message says how to proceed for unknown types).
        NonFiniteWeightsError: A floating-point tensor holds NaN or Inf (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeNotFoundError("no such checkpoint file", path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # SafetensorError, OSError on a truncated or garbled file
            raise CorruptFileError(
                f"cannot read the safetensors file, truncated or not safetensors ({type(error).__name__}: "
                f"{' '.join(str(error).split())})",
                path,
            ) from error
    elif path.suffix in (".ckpt", ".pth", ".pt", ".bin"):
        state = _torch_load_state(path, trust_checkpoint)
    else:
        raise UnsupportedFormatError("expected a .ckpt, .pth, .pt, .bin or .safetensors checkpoint", path)
    if not state:
        raise UnsupportedFormatError("the checkpoint holds no tensors", path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if require_finite:
        check_finite_weights(state, path)
    return state


def _torch_load_state(path: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    try:
        if trust_checkpoint:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        hint = ""
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            hint = "; it stores types outside the allow-list: pass trust_checkpoint=True (--trust-checkpoint) for a file you trust"
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise CorruptFileError(
            f"cannot read the checkpoint ({type(error).__name__}: {first}){hint}", path
        ) from error
    state = payload
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "module"):
            if isinstance(payload.get(key), dict):
                state = payload[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise UnsupportedFormatError(
            "no state dict of tensors found (looked at the file, 'state_dict', 'model', 'module')", path
        )
    return state


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str | os.PathLike | None = None) -> None:
    """Refuse floating-point tensors holding NaN or Inf.

    Raises:
        NonFiniteWeightsError: Naming the first such tensors and how many values are bad.
    """
    bad = []
    for key, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad.append(f"{key} ({count} of {value.numel()} values)")
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise NonFiniteWeightsError(
            f"NaN or Inf weights in {', '.join(bad[:4])}{more}; the checkpoint is damaged or diverged", source
        )


def require_keys(
    state: Mapping[str, torch.Tensor], keys: Iterable[str], source: str | os.PathLike | None, what: str
) -> None:
    """Refuse a state dict lacking one of ``keys`` (the tensors config inference reads).

    Raises:
        CheckpointMismatchError: Naming the missing keys and what the checkpoint should be.
    """
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointMismatchError(f"not a {what} checkpoint: it lacks {missing}", source)


def load_state_dict_strict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike | None,
    ignore_missing_prefixes: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Load ``state`` into ``model``, refusing missing keys, unexpected keys and wrong shapes; return it in eval.

    Args:
        model: The freshly built model.
        state: Converted weights.
        source: The checkpoint they came from (named in the error).
        ignore_missing_prefixes: Model keys that may stay missing (buffers the model recomputes).

    Raises:
        CheckpointMismatchError: Naming (up to 8 of) the missing, unexpected or mis-shaped tensors.
    """
    expected = model.state_dict()
    wrong = [
        f"{key} {tuple(value.shape)} (model expects {tuple(expected[key].shape)})"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    missing = [k for k in expected if k not in state and not k.startswith(ignore_missing_prefixes)]
    unexpected = [k for k in state if k not in expected]
    if wrong or missing or unexpected:
        parts = []
        for label, keys in (("wrong shapes", wrong), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
                parts.append(f"{label}: {keys[:8]}{more}")
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__} ({'; '.join(parts)})", source
        )
    model.load_state_dict(dict(state), strict=False)
    return model.eval()


# --- load-time weight adaptation (``from_pretrained``) ------------------------------------------------------
# A pre-trained checkpoint is loaded into a fine-tuning config that differs in shape-determined ways (another
# input size, channel count or patch): each family names the tensors to adapt and how, and transformers'
# weight-conversion hooks run the adaptation when ``from_pretrained`` reads the tensor.


def single_tensor(input_dict: Mapping[str, Any]) -> torch.Tensor:
    """The one tensor a one-to-one :class:`~transformers.core_model_loading.ConversionOps` receives."""
    (value,) = input_dict.values()
    return value[0] if isinstance(value, list) else value


class KeepAsSaved(ConversionOps):
    """Saving writes adapted weights as they are (the adaptation cannot, and need not, be undone).

    The reverse of every :class:`LoadTimeAdaptation`: a model saved after adapting holds the adapted tensors
    under the same names, and loading them again into the same config finds nothing left to adapt.
    """

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        """Pass the tensor through under its target name."""
        return {target_patterns[0]: single_tensor(input_dict)}

    @property
    def reverse_op(self) -> ConversionOps:
        """Itself."""
        return self


class LoadTimeAdaptation(ConversionOps):
    """A weight-loading op that fits one checkpoint tensor to the model's config; subclasses define :meth:`adapt`.

    :meth:`adapt` must return the tensor unchanged when it already fits, so that a saved adapted model reloads
    without adapting twice; saving uses :class:`KeepAsSaved`.
    """

    def adapt(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """``tensor`` fitted to ``config`` (the model's config), or ``tensor`` itself when it already fits."""
        raise NotImplementedError

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        """Apply :meth:`adapt` (nothing without a config)."""
        tensor = single_tensor(input_dict)
        if config is not None:
            tensor = self.adapt(tensor, config)
        return {target_patterns[0]: tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        """:class:`KeepAsSaved`."""
        return KeepAsSaved()


def register_load_time_adaptation(model_type: str, adaptations: Sequence[tuple[str, ConversionOps]]) -> None:
    """Hook ``(pattern, op)`` pairs into ``from_pretrained`` for every model of ``model_type`` (idempotent).

    Each pattern names a tensor and keeps its name (a regex searched in the checkpoint key, ending on a name
    boundary; a lookbehind such as ``(?<!\\w)`` anchors its start); the op adapts it on loading. Registering
    again replaces the family's mapping.
    """
    register_checkpoint_conversion_mapping(
        model_type,
        [WeightConverter(pattern, pattern, [op]) for pattern, op in adaptations],
        overwrite=True,
    )


# --- writing the output folder ------------------------------------------------------------------------------


def check_output_folder(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output path :func:`atomic_output_folder` would not write (see there); call it early.

    Raises:
        OutputPathError: A file, a link, or a non-empty folder that is no medfm conversion.
        OverwriteInputError: An input lies in ``output``.
    """
    output = Path(output)
    if output.is_symlink():
        raise OutputPathError("the output is a symbolic link; give a real folder path", output)
    if output.exists() and not output.is_dir():
        raise OutputPathError("the output exists and is a file; give a folder path", output)
    resolved = output.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            raise OverwriteInputError(
                f"refusing to write over the input {item} (it lies in the output)", output
            )
    if output.is_dir() and any(output.iterdir()) and not (output / CONVERSION_MARKER).is_file():
        raise OutputPathError(
            f"the output folder is not empty and is not a previous medfm conversion (no {CONVERSION_MARKER}); "
            "give a new or empty folder (nothing was deleted)",
            output,
        )


@contextlib.contextmanager
def atomic_output_folder(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``output``; on success rename it to ``output``, on failure remove it.

    The caller must write :data:`CONVERSION_MARKER` into the folder (that is what lets a later conversion
    replace it). An existing empty folder or previous conversion at ``output`` is replaced only after the new
    folder is complete.

    Args:
        output: The folder to create.
        inputs: Input files, refused if they lie in ``output``.

    Raises:
        OutputPathError: ``output`` is a file, a link, or a non-empty folder that is no medfm conversion.
        OverwriteInputError: An input lies in ``output``.
        OutputWriteError: Writing failed with an ``OSError`` (disk full...); the message names the output.
    """
    output = Path(output)
    inputs = list(inputs)
    check_output_folder(output, inputs)
    created = []  # parent folders made here, removed again on failure
    for parent in reversed(output.absolute().parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as error:
                _remove_created(created)
                raise OutputWriteError(
                    f"cannot create the folder {parent} ({error.strerror or error})", output
                ) from error
            created.append(parent)
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.absolute().parent))
    except OSError as error:
        _remove_created(created)
        raise OutputWriteError(
            f"cannot create a folder next to the output ({error.strerror or error})", output
        ) from error
    try:
        yield temp
        check_output_folder(output, inputs)  # it may have changed while converting
        _commit(temp, output)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        _remove_created(created)
        if isinstance(error, OSError) and not isinstance(error, MedfmError):
            kind = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file is too large"}.get(error.errno, "")
            where = f" ({error.filename})" if getattr(error, "filename", None) else ""
            raise OutputWriteError(
                f"writing the conversion failed{': ' + kind if kind else ''}{where} "
                f"({type(error).__name__}: {error.strerror or error}); no output was left",
                output,
            ) from error
        raise


def _commit(temp: Path, output: Path) -> None:
    if not output.exists():
        os.rename(temp, output)
        return
    backup = output.with_name(f".{output.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(output, backup)
    try:
        os.rename(temp, output)
    except BaseException:
        os.rename(backup, output)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()
