"""Shared test set-up: quiet TensorFlow, a private cache of prepared corpora, the package importable from a
checkout, every test seeded."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Prepared corpora go to a cache of this session's own (also for the scripts the tests start), not ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="llm_unitscale_cache.")
os.environ["LLM_UNITSCALE_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed Python, NumPy, TensorFlow and Keras before every test (weight inits, dropout)."""
    import keras  # here, not at the top: pytest-xdist's controller runs no test and need not load TensorFlow

    keras.utils.set_random_seed(0)
