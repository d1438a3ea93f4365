"""Fixtures shared by the test suite (helpers live in tests/helpers.py)."""

from pathlib import Path

import pytest


@pytest.fixture
def job_file(tmp_path):
    def make(text: str, name="job.toml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return make
