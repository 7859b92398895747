"""Shared test set-up: quiet TensorFlow, the package importable from a checkout, every test seeded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed Python, NumPy, TensorFlow and Keras before every test (weight inits, dropout)."""
    keras.utils.set_random_seed(0)
