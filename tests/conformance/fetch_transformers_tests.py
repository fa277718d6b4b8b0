"""Fetch the common model tests of the installed transformers release into a local cache.

transformers' source distribution on PyPI ships its top-level ``tests/*.py``. The conformance tests run
two of them (``test_modeling_common.py``, ``test_configuration_common.py``) against medfm's models. They
are downloaded with ``pip download`` on first use and cached outside the repository; nothing of them is
copied into it.

Cache: ``$MEDFM_TRANSFORMERS_TESTS_CACHE``, else ``$XDG_CACHE_HOME/medfm``, else ``~/.cache/medfm``; one
folder ``transformers-tests-<version>/`` per release, holding the package ``hf_release_tests`` (named so
that it cannot shadow this repository's ``tests`` package).

Run as a script to fill the cache ahead of time (prints the folder to put on ``sys.path``)::

    python tests/conformance/fetch_transformers_tests.py [--version 5.24.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The release files the conformance tests import (paths inside the sdist's ``tests/`` folder).
NEEDED_FILES = ("test_modeling_common.py", "test_configuration_common.py")
PACKAGE = "hf_release_tests"
_COMPLETE = ".complete"


class TransformersTestsUnavailable(RuntimeError):
    """The release's test files could not be downloaded or read."""


def installed_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def cache_root() -> Path:
    explicit = os.environ.get("MEDFM_TRANSFORMERS_TESTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medfm"


def release_tests_dir(version: str | None = None) -> Path:
    """The folder holding package ``hf_release_tests`` for ``version`` (the installed one by default).

    Downloads and extracts on first use; later calls only check the cache.

    Raises:
        TransformersTestsUnavailable: pip could not download the sdist, or it lacks the files.
    """
    version = version or installed_version()
    target = cache_root() / f"transformers-tests-{version}"
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".transformers-{version}-") as work:
        work_dir = Path(work)
        sdist = _download_sdist(version, work_dir / "download")
        staging = work_dir / "staging"
        _extract(sdist, version, staging / PACKAGE)
        # An empty package marker: the release files import each other relatively.
        (staging / PACKAGE / "__init__.py").write_text("")
        (staging / _COMPLETE).write_text(f"transformers=={version} from {sdist.name}\n")
        try:
            os.rename(staging, target)  # atomic: a concurrent worker either wins or finds it complete
        except OSError:
            if not (target / _COMPLETE).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    return target


def _download_sdist(version: str, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--quiet",
        f"transformers=={version}",
        "-d",
        str(folder),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TransformersTestsUnavailable(f"`{' '.join(command)}` could not run: {error}") from error
    archives = sorted(folder.glob(f"transformers-{version}.tar.gz")) if folder.is_dir() else []
    if result.returncode != 0 or not archives:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise TransformersTestsUnavailable(
            f"could not download the transformers {version} source distribution from PyPI, which ships the "
            f"common model tests the conformance suite runs.\nCommand: {' '.join(command)}\n"
            f"Exit status {result.returncode}; pip said:\n{tail}\n"
            "Fix: make PyPI reachable (or set PIP_INDEX_URL), or fill the cache once where it is reachable "
            f"(python tests/conformance/fetch_transformers_tests.py) and point MEDFM_TRANSFORMERS_TESTS_CACHE "
            f"at it (now {cache_root()})."
        )
    return archives[0]


def _extract(sdist: Path, version: str, destination: Path) -> None:
    destination.mkdir(parents=True)
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist, "r:gz") as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        for name in NEEDED_FILES:
            member = members.get(prefix + name)
            if member is None:
                raise TransformersTestsUnavailable(
                    f"{sdist.name} has no {prefix + name}; this transformers release does not ship the "
                    "common tests the conformance suite runs"
                )
            source = archive.extractfile(member)
            assert source is not None
            (destination / name).write_bytes(source.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="transformers release (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        print(release_tests_dir(args.version))
    except TransformersTestsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
