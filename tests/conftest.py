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


@pytest.fixture(scope="session")
def int8_model(tiny_build, tmp_path_factory) -> Path:
    """The tiny checkpoint exported with its int8 variant too (the manifest chooses which one is served)."""
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("int8") / "model"
    export_model(tiny_build / "run" / "best.safetensors", out, quantize="int8", val_data=tiny_build / "midi")
    return out


@pytest.fixture(scope="session")
def libraries(tmp_path_factory) -> dict[str, Path]:
    """The native operator library built once per code path this CPU runs (tests/native_builds.py)."""
    from tests.native_builds import build_libraries

    return build_libraries(tmp_path_factory.mktemp("native"))


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


@pytest.fixture
def models_dir(tiny_model, tmp_path) -> Path:
    """A models directory holding the tiny model as `default`."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(tiny_model, root / "default")
    return root


@pytest.fixture
def service(models_dir, tmp_path):
    """A running Service over `models_dir` (workers started; closed after the test)."""
    from plugin_bridge.models import ModelRegistry
    from plugin_bridge.service import Service

    registry = ModelRegistry(models_dir)
    assert registry.scan() == ["default"]
    svc = Service(registry, tmp_path / "clips", workers=2)
    yield svc
    svc.close()
    registry.stop()


def clip_payload(bars: int = 4, meter=(4, 4)) -> dict:
    """A small real clip in protocol form: a rising figure with a bass note per bar."""
    beats = meter[0] * 4 / meter[1]
    notes = []
    for bar in range(bars):
        notes.append([48 + (bar % 3) * 2, 70, bar * beats, beats * 0.9, 0])
        for step in range(int(beats * 2)):
            notes.append([60 + (step * 2 + bar) % 12, 80 + step % 3 * 10, bar * beats + step * 0.5, 0.45, 0])
    return {"notes": notes, "tempo": 110.0, "time_signature": list(meter), "length": bars * beats, "program": 0}
