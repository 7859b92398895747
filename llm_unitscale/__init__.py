"""llm_unitscale: unit-scaled language models and text classifiers in TensorFlow/Keras.

Importing the package registers every custom layer, constraint, loss and the optimizer (``UnitAdamW``) with
Keras, so ``keras.models.load_model("run/model.keras")`` works in a fresh process after ``import llm_unitscale``,
optimizer state included. A Ctrl-C during this import (TensorFlow's, seconds) ends the program with one line
and status 130 if nothing catches it (``llm_unitscale.interrupts``).
"""

import os as _os
import sys as _sys

from llm_unitscale import interrupts as _interrupts  # the standard library only: imported in milliseconds


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banners (oneDNN, CUDA probing) hidden.

    They are written to fd 2 before Python logging exists, so fd 2 is pointed at /dev/null during the import.
    Set TF_CPP_MIN_LOG_LEVEL yourself (e.g. 0) to keep TensorFlow's C++ logs.
    """
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in _sys.modules:
        return
    saved = _os.dup(2)
    try:
        with open(_os.devnull, "w") as devnull:
            _os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)


try:
    with _interrupts.sticky_interrupt() as _check_interrupted:
        try:
            _import_tensorflow_quietly()

            from llm_unitscale import constraints, optimizers  # noqa: F401  (and layers, models, ops: registered)
            from llm_unitscale.constraints import UnitScaling
            from llm_unitscale.models import build_model
        except Exception:
            _check_interrupted()  # a Ctrl-C that an import turned into another error is still a Ctrl-C
            raise
except KeyboardInterrupt:
    _interrupts.report_uncaught()
    raise

__version__ = "0.1.0"
#: The KerasHub-shaped task models (:mod:`llm_unitscale.hub`), imported on first use: KerasHub takes a second to
#: import, which the command-line scripts do not need, and it is the optional extra ``hub``.
_HUB_NAMES = ("CausalLM", "CausalLMPreprocessor", "TextClassifier", "TextClassifierPreprocessor", "UnitBackbone",
              "UnitTokenizer")
__all__ = ["UnitScaling", "build_model", "constraints", "layers", "models", "ops", "__version__", *_HUB_NAMES]


def __getattr__(name: str) -> object:
    if name in _HUB_NAMES:
        try:
            from llm_unitscale import hub
        except ModuleNotFoundError as exc:
            if exc.name not in ("keras_hub", "tensorflow_text"):
                raise
            raise ImportError(f"llm_unitscale.{name} needs KerasHub: pip install 'llm-unitscale[hub]' "
                              "(or pip install keras-hub)") from exc
        return getattr(hub, name)
    raise AttributeError(f"module 'llm_unitscale' has no attribute {name!r}")
