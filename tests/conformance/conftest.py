"""Conformance tests: transformers' own common model tests run against every medfm model class.

The release's test files are fetched (``pip download`` of the installed transformers' sdist) into a cache
when this folder is collected. If that fails, the family files are not collected and the single test in
``test_release_tests_available.py`` fails with the reason, so the rest of the suite still runs and reports.
"""

from __future__ import annotations

from .fetch_transformers_tests import TransformersTestsUnavailable, release_tests_dir

# Markers the release's test files put on their tests (transformers' own conftest registers them; this
# repository runs pytest with --strict-markers).
RELEASE_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
    "is_training_test",
    "is_pipeline_test",
    "is_staging_test",
    "is_agent_test",
    "is_fsdp_test",
    "is_tensor_parallel_test",
    "is_expert_parallel_test",
    "order",
)


def pytest_configure(config) -> None:
    for marker in RELEASE_MARKERS:
        config.addinivalue_line("markers", f"{marker}: set by transformers' common tests")


FETCH_ERROR: str | None = None
try:
    release_tests_dir()
except TransformersTestsUnavailable as error:
    FETCH_ERROR = str(error)
    collect_ignore_glob = ["test_*_conformance.py"]
