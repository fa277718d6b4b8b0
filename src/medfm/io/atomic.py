"""Atomic file output: write to a temporary sibling, then rename over the destination.

A reader never sees a half-written file, a crash leaves the destination untouched, and no writer in
medfm replaces the file its data came from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputWriteError, OverwriteInputError

# OS errors that mean the output cannot be written, and how to say so.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for this file system",
    errno.EACCES: "permission denied",
    errno.EROFS: "the file system is read-only",
}

__all__ = ["atomic_output", "compound_suffix", "refuse_overwrite"]


def compound_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz`` for ``a.nii.gz``, ``.png`` for ``a.png``: the suffix a library picks a format from."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def refuse_overwrite(destination: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise if ``destination`` is (or lies inside) one of ``inputs``.

    Raises:
        OverwriteInputError: The destination would replace an input file or a file of an input folder.
    """
    dest = Path(destination).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if dest == src or (src.is_dir() and src in dest.parents):
            raise OverwriteInputError(
                f"refusing to write over the input {src}; choose another output path", destination
            )


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(
    destination: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[str]:
    """Yield a temporary path next to ``destination``; on success rename it onto ``destination``.

    The temporary name keeps the destination's suffix (``.nii.gz``...) so format-sniffing writers work.
    On any exception the temporary file is removed and the destination is left as it was.

    Args:
        destination: Final path. Its parent folder is created if missing.
        inputs: Paths the data was read from; writing onto any of them raises.
    """
    destination = Path(destination)
    refuse_overwrite(destination, inputs)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=f".tmp{compound_suffix(destination)}", dir=destination.parent
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, destination)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        reason = _WRITE_FAILURES.get(getattr(error, "errno", None))
        if reason is not None and not isinstance(error, OutputWriteError):
            raise OutputWriteError(
                f"cannot write it: {reason} ({error}); nothing was left behind", destination
            ) from error
        raise
