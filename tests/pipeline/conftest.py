"""Tiny phantoms and tiny settings shared by the end-to-end pipeline tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory):
    """Six small phantoms (4 training, 1 validation, 1 test) written once per test session."""
    from medhpm.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out, cases=6, seed=3, size=(56, 56, 36))
