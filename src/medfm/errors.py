"""Typed exceptions raised by medfm.

Every error medfm raises on bad input derives from :class:`MedfmError`, so callers can catch one type.
Each class also derives from the closest built-in exception (``FileNotFoundError``, ``ValueError``...) so
code written against the standard library keeps working. Messages name the file (when there is one),
what was wrong, and what was expected.
"""

from __future__ import annotations

import os

__all__ = [
    "SELF_EXPLAINING_ERRORS",
    "AppDependencyError",
    "AppPortError",
    "BatchItemError",
    "BatchOutputError",
    "CheckpointMismatchError",
    "CheckpointShapeMismatchError",
    "CorruptFileError",
    "DatasetError",
    "DeviceUnavailableError",
    "DicomSeriesError",
    "DistributedLaunchError",
    "EmptySeriesError",
    "HubUploadError",
    "InvalidConfigError",
    "InvalidGeometryError",
    "InvalidIntensityError",
    "LabelMapError",
    "MedfmError",
    "MemoryBudgetError",
    "MixedSeriesError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelProcessorMismatchError",
    "NonFiniteOutputError",
    "NonFiniteWeightsError",
    "OutputPathError",
    "OutputWriteError",
    "OverwriteInputError",
    "PretrainingOptionError",
    "ProcessorConfigError",
    "UnsupportedFormatError",
    "VolumeNotFoundError",
    "VolumeShapeError",
    "WrongTaskError",
    "first_line",
    "one_line",
]


class MedfmError(Exception):
    """Base class of every medfm error.

    Args:
        message: What was wrong and what was expected.
        path: The file or folder the error is about, if any; it is prefixed to the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class VolumeNotFoundError(MedfmError, FileNotFoundError):
    """The input path does not exist."""


class UnsupportedFormatError(MedfmError, ValueError):
    """The file is neither NIfTI nor DICOM (nor another format the caller asked for)."""


class CorruptFileError(MedfmError, ValueError):
    """The file has a known format but cannot be decoded (truncated, bad header, bad pixel data)."""


class VolumeShapeError(MedfmError, ValueError):
    """The array has the wrong number of dimensions or an unusable shape."""


class InvalidIntensityError(MedfmError, ValueError):
    """The voxel values are unusable: all NaN, or containing +/-Inf."""


class InvalidGeometryError(MedfmError, ValueError):
    """Spacing or affine is unusable: zero, negative or non-finite spacing, or a singular affine."""


class DicomSeriesError(MedfmError, ValueError):
    """A DICOM folder cannot be assembled into one volume."""


class EmptySeriesError(DicomSeriesError):
    """A folder holds no readable DICOM image."""


class MixedSeriesError(DicomSeriesError):
    """A folder holds slices of more than one series and no series was chosen."""


class OverwriteInputError(MedfmError, FileExistsError):
    """A writer was asked to write over the file its data was read from."""


class DatasetError(MedfmError, ValueError):
    """A dataset source is empty or holds nothing usable."""


class ProcessorConfigError(MedfmError, ValueError):
    """An image processor step or preset is unknown or has invalid parameters."""


class LabelMapError(MedfmError, ValueError):
    """An array given as a label map holds something else: non-integer values (probabilities, logits,
    intensities) or one channel per class."""


class WrongTaskError(MedfmError, ValueError):
    """A model's head is not the one the task needs (a segmentation model given to a classifier, a pre-trained
    backbone with no head given to either...)."""


class DeviceUnavailableError(MedfmError, ValueError):
    """A device name is not one torch knows, or names a device this machine does not have."""


class ModelLoadError(MedfmError, OSError):
    """A model folder or Hub id cannot be loaded (missing files, unreachable Hub, unusable adapter)."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model folder does not exist, and the name is not a Hub model either."""


class MemoryBudgetError(MedfmError, MemoryError):
    """An operation would allocate more than the memory budget (``MEDFM_MEMORY_BUDGET``, else a share of the
    machine's available memory); the message gives what it needs and the budget."""


class InvalidConfigError(MedfmError, ValueError):
    """A model config has a field of the wrong type, out of range, or inconsistent with another field (or with
    the checkpoint); the message names the field, the value and what is allowed."""


class CheckpointMismatchError(UnsupportedFormatError):
    """A checkpoint's tensors do not fit the model: missing or unexpected keys, or tensors of the wrong shape."""


class CheckpointShapeMismatchError(CheckpointMismatchError, RuntimeError):
    """A checkpoint's tensors have other shapes than the config (as overridden) asks for. Also a RuntimeError,
    which is what transformers raises there, so code written against transformers keeps catching it.

    Attributes:
        mismatched: ``(name, checkpoint shape, model shape)`` of each tensor that does not fit, where known.
    """

    def __init__(
        self,
        message: str,
        path: str | os.PathLike | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ):
        super().__init__(message, path)
        self.mismatched = list(mismatched or [])


class NonFiniteWeightsError(MedfmError, ValueError):
    """A checkpoint holds NaN or +/-Inf weights; the message names the tensor."""


class OutputPathError(MedfmError, FileExistsError):
    """An output path cannot be used: it is a file, a link, or a non-empty folder this program did not write."""


class OutputWriteError(MedfmError, OSError):
    """Writing an output failed (disk full, file too large, no permission); nothing partial was left behind."""


class BatchOutputError(MedfmError, ValueError):
    """A batch's outputs would collide: one ``save_to`` / ``overlay_to`` file for several inputs, or a folder
    or pattern giving two inputs the same output name. Nothing was run or written."""


class BatchItemError(MedfmError, ValueError):
    """Item ``index`` of a batch failed. ``error`` is what it raised, ``written`` what earlier items had
    already written (kept, and listed in the message)."""

    def __init__(self, message: str, path=None, *, index: int = 0, written=(), error=None):
        super().__init__(message, path)
        self.index = index
        self.written = list(written)
        self.error = error


class ModelProcessorMismatchError(MedfmError, ValueError):
    """A model and its processor disagree (channels, spatial dims): the message says which file to fix."""


class NonFiniteOutputError(MedfmError, ArithmeticError):
    """A model produced NaN or Inf where an answer was expected."""


class HubUploadError(MedfmError, ConnectionError):
    """The Hub could not be reached or refused the upload (the message says what was kept and where)."""


class PretrainingOptionError(MedfmError, ValueError):
    """A command-line option of a pre-training run has a value the run cannot use; the message names the
    option, the value and what is allowed."""


class DistributedLaunchError(MedfmError, RuntimeError):
    """A multi-process launch the training loop cannot run as launched (processes that do not see each
    other, an engine setting missing); the message says which setting to change."""


class AppDependencyError(MedfmError, ImportError):
    """The web viewer needs Gradio, an optional dependency (the ``app`` extra), and it is not installed."""


class AppPortError(MedfmError, OSError):
    """The viewer's address or port cannot be used (taken, or not an address of this machine)."""


#: Errors whose message is the whole story; any other exception is also named by its type.
SELF_EXPLAINING_ERRORS = (MedfmError, ValueError, OSError, KeyError, TypeError)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (a KeyError's without its quotes), or its type's
    name when the message is empty."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def one_line(error: BaseException, text: str | None = None) -> str:
    """An error as one line for a person: the first line of ``text`` (default: the error's message), named by
    the error's type unless it is one of :data:`SELF_EXPLAINING_ERRORS`."""
    if text is None:
        line = first_line(error)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        line = lines[0] if lines else type(error).__name__
    return line if isinstance(error, SELF_EXPLAINING_ERRORS) else f"{type(error).__name__}: {line}"
