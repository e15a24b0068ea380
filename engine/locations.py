"""Where Segue looks for things by default: the one place these paths are decided."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the install's source tree (pip install -e), holding models/


def default_models_dir() -> Path:
    """The folder of model folders that `segue serve` loads."""
    return REPO_ROOT / "models"


def default_model_dir() -> Path:
    """The model `segue continue`, `segue finetune` and `segue eval` use unless told otherwise ($SEGUE_MODEL)."""
    return Path(os.environ.get("SEGUE_MODEL", default_models_dir() / "default"))


def default_clips_dir() -> Path:
    """Where the server writes finished continuations for drag-and-drop."""
    return Path.home() / "Segue" / "clips"
