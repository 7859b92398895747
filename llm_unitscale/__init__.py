"""llm_unitscale: unit-scaled language models and text classifiers in TensorFlow/Keras.

Importing the package registers every custom layer, constraint and loss with Keras, so
``keras.models.load_model("run/model.keras")`` works in a fresh process after ``import llm_unitscale``.
"""

from llm_unitscale import constraints, layers, models, ops
from llm_unitscale.constraints import UnitScaling
from llm_unitscale.models import build_model

__version__ = "0.1.0"
__all__ = ["UnitScaling", "build_model", "constraints", "layers", "models", "ops", "__version__"]
