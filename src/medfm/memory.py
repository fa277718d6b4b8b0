"""Memory budgets: refuse an allocation that cannot fit before making it.

A 1.4 kB NIfTI header may claim 100000³ voxels, and a spacing of 1e5 mm makes resampling to 1 mm ask for
10^18 bytes. Readers and spatial steps compute what they are about to allocate and call
:func:`check_allocation`, which raises :class:`~medfm.errors.MemoryBudgetError` with the numbers instead of
letting the allocator fail with a traceback (or the machine swap).

The budget is ``MEDFM_MEMORY_BUDGET`` when set (bytes, or a number with a unit: ``8GB``, ``512MiB``),
else 80% of the memory the machine has available now (``/proc/meminfo``'s ``MemAvailable``, or
``os.sysconf`` where there is no ``/proc``).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from .errors import MemoryBudgetError

__all__ = [
    "BUDGET_ENV",
    "DEFAULT_FRACTION",
    "MAX_SPACING_MM",
    "MIN_SPACING_MM",
    "REUSE_FREED_MEMORY_ENV",
    "array_bytes",
    "available_memory",
    "check_allocation",
    "format_bytes",
    "memory_budget",
    "parse_size",
    "reuse_freed_memory",
    "warn_implausible_spacing",
]

#: Environment variable that sets the budget.
BUDGET_ENV = "MEDFM_MEMORY_BUDGET"
#: Share of the available memory used as the budget when the variable is not set.
DEFAULT_FRACTION = 0.8
#: Spacings a scanner can produce lie between these (mm); outside them a warning is given.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e3

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"8GB"`` -> 8_000_000_000; ``"512MiB"``, ``"1e9"``, ``"1000000"`` also work.

    Raises:
        MemoryBudgetError: Not a size.
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise MemoryBudgetError(
            f"{BUDGET_ENV}={text!r} is not a size; expected bytes or a number with a unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 8GB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise MemoryBudgetError(f"{BUDGET_ENV}={text!r} must be a positive size, e.g. 8GB")
    return int(value)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now, or ``None`` when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def memory_budget() -> tuple[int | None, str]:
    """The budget in bytes (``None``: no limit known) and where it came from, for messages."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if text:
        return parse_size(text), BUDGET_ENV
    available = available_memory()
    if available is None:
        return None, "no limit: the available memory is unknown"
    return int(available * DEFAULT_FRACTION), (
        f"{DEFAULT_FRACTION:.0%} of the {format_bytes(available)} available; set {BUDGET_ENV} to change it"
    )


def format_bytes(count: float) -> str:
    """``19.2 GB``, ``512.0 MB``... (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def array_bytes(shape: Sequence[int], dtype: np.dtype | str | type = np.float32) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, computed in Python integers (no overflow)."""
    return math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize


def check_allocation(
    nbytes: int,
    what: str,
    path: str | os.PathLike | None = None,
    hint: str = "use a coarser grid or a smaller image",
) -> None:
    """Refuse an allocation of ``nbytes`` beyond the memory budget.

    Args:
        nbytes: What the operation would allocate (arrays and temporaries).
        what: What is allocated, e.g. ``"a (1, 100000, 100000, 100000) float32 grid for the 'resample' step"``.
        path: The file the data come from, if any.
        hint: What to do about it.

    Raises:
        MemoryBudgetError: ``nbytes`` exceeds the budget; the message gives both numbers.
    """
    budget, source = memory_budget()
    if budget is None or nbytes <= budget:
        return
    raise MemoryBudgetError(
        f"needs {_scientific(nbytes)} bytes for {what}; the budget is {format_bytes(budget)} ({source}); {hint}",
        path,
    )


def _scientific(count: int) -> str:
    """``4.0e18`` (no ``+`` or leading zero in the exponent)."""
    mantissa, exponent = f"{float(count):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def warn_implausible_spacing(
    spacing: Sequence[float], path: str | os.PathLike | None = None, *, stacklevel: int = 3
) -> None:
    """Warn (``UserWarning`` naming the file) when a spacing is outside what a scanner can produce."""
    values = [float(s) for s in spacing]
    odd = [s for s in values if math.isfinite(s) and not MIN_SPACING_MM <= s <= MAX_SPACING_MM]
    if odd:
        where = os.fspath(path) if path is not None else "array input"
        warnings.warn(
            f"{where}: voxel spacing {tuple(float(f'{s:.6g}') for s in values)} mm is outside what a scanner "
            f"produces ({MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm); check the header's units and pixdim",
            UserWarning,
            stacklevel=stacklevel,
        )


#: Environment variable that turns :func:`reuse_freed_memory` off (``0``).
REUSE_FREED_MEMORY_ENV = "MEDFM_REUSE_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_reuse_state: bool | None = None


def reuse_freed_memory() -> bool:
    """Keep freed CPU tensors' memory in the process for the next ones (glibc only; once per process).

    glibc gives every allocation above 32 MiB its own ``mmap`` and returns it to the kernel on ``free``, so a
    window loop whose activations are hundreds of MB each gets fresh zeroed pages for every layer of every
    window: measured on a 48x192x192 SPAD-ViT window, 2.2 million page faults and 3.5 s of system time per
    window (the model's own work took 7.6 s). With ``mallopt(M_MMAP_MAX, 0)`` and a high trim threshold, large
    blocks come from the heap and stay there after ``free``; the next window reuses them. The price: the
    process keeps its peak memory until it exits, which is what a batch inference job wants, and not what a
    long-running service or notebook may want: so ``medfm segment`` calls it, the library does not (call it
    yourself in an inference script). It acts on the main thread's heap (glibc's other threads' arenas still
    map large blocks). Set ``MEDFM_REUSE_FREED_MEMORY=0`` to leave the allocator alone. (Preloading jemalloc
    or tcmalloc does the same job for a whole program.)

    Returns:
        Whether the allocator is now set so (False on other C libraries, or when turned off).
    """
    global _reuse_state
    if _reuse_state is not None:
        return _reuse_state
    _reuse_state = False
    if os.environ.get(REUSE_FREED_MEMORY_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _reuse_state = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _reuse_state
