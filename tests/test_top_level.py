"""Top-level names, as transformers has them: ``from medfm import <any public name of a family>``.

The names come from each family package's ``__all__`` (the packages listed in ``FAMILY_MODULES``); this file
names no family's classes either.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

import medfm
from medfm.models.registry import FAMILY_MODULES

FAMILY_RECORD = "FAMILY"  # each family's record: not a top-level name

PUBLIC_NAMES = [
    (module_name, name)
    for module_name in FAMILY_MODULES
    for name in importlib.import_module(module_name).__all__
    if name != FAMILY_RECORD
]

# Verified not to be needed by `import medfm` (registration, pipelines, varlen attention): they load only
# when used. Triton itself is not listed: torch imports it when it is installed.
NOT_IMPORTED = (
    "medfm.training",
    "medfm.data",
    "medfm.cli",
    "medfm.demo",
    "medfm.hub",
    "medfm.peft",
    "medfm.visualization",
    "medfm.kernels._flash_varlen_kernels",  # the Triton kernels load at their first launch
    "medfm.kernels._rope3d_kernel",
    "transformers.trainer",
    "datasets",
    "peft",
    # MONAI is imported where it is used (metrics, inference, losses, the UNETR decoder); with the pandas and
    # matplotlib it pulls in it would add about 1.5 s to `import medfm`.
    "monai",
    "pandas",
    "matplotlib",
)


def test_every_family_lists_public_names() -> None:
    for module_name in FAMILY_MODULES:
        exported = importlib.import_module(module_name).__all__
        assert set(exported) - {FAMILY_RECORD}, f"{module_name}.__all__ lists no public names"


@pytest.mark.parametrize(("module_name", "name"), PUBLIC_NAMES, ids=[name for _, name in PUBLIC_NAMES])
def test_family_names_are_top_level(module_name: str, name: str) -> None:
    expected = getattr(importlib.import_module(module_name), name)
    assert getattr(medfm, name) is expected
    namespace: dict = {}
    exec(f"from medfm import {name}", namespace)
    assert namespace[name] is expected
    assert name in dir(medfm)


def test_dir_keeps_the_module_names() -> None:
    listed = dir(medfm)
    assert listed == sorted(set(listed))
    for name in ("MedicalImageProcessor", "MedicalVolume", "load_volume", "errors", "__version__"):
        assert name in listed


def test_the_family_record_is_not_top_level() -> None:
    assert not hasattr(medfm, FAMILY_RECORD)


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(
        AttributeError, match=r"module 'medfm' has no attribute 'NoSuchModel'.*FAMILY_MODULES"
    ):
        medfm.NoSuchModel  # noqa: B018
    assert not hasattr(medfm, "__wrapped__")
    with pytest.raises(ImportError):
        exec("from medfm import NoSuchModel", {})


def test_unknown_names_get_a_hint() -> None:
    _, name = PUBLIC_NAMES[0]
    with pytest.raises(AttributeError, match=rf"did you mean .*{re.escape(repr(name))}"):
        getattr(medfm, name[:-1])
    if "medfm.training" not in sys.modules:
        with pytest.raises(AttributeError, match=re.escape("`import medfm.training`")):
            medfm.training  # noqa: B018


def test_import_medfm_loads_only_what_it_needs() -> None:
    code = (
        "import json, sys\n"
        "import medfm\n"
        f"print(json.dumps({{'loaded': [m for m in {list(NOT_IMPORTED)!r} if m in sys.modules],\n"
        "                   'name_map_built': medfm._family_names is not None}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"loaded": [], "name_map_built": False}
