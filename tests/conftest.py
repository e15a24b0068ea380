"""Shared fixtures: a tiny model trained and exported once per test session (seconds, no network)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """OUT with midi/ (synthetic corpus), run/ (checkpoints) and model/ (exported folder)."""
    out = tmp_path_factory.mktemp("tiny")
    make_tiny_model.build(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_build) -> Path:
    return tiny_build / "model"


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model folder that a test may tamper with."""
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    return target


@pytest.fixture(scope="session")
def generator(tiny_model):
    from engine.generate import Generator

    return Generator.load(tiny_model)


@pytest.fixture(scope="session")
def example_midi(tiny_build) -> list[Path]:
    return sorted((tiny_build / "midi").glob("*.mid"))
