"""The release's common tests were fetched; otherwise this fails with pip's reason and how to fix it."""

from __future__ import annotations

from .conftest import FETCH_ERROR


def test_transformers_release_tests_available() -> None:
    assert FETCH_ERROR is None, FETCH_ERROR
