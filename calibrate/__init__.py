"""The sab calibrator: binarize a Hugging Face VLM into a packed sab checkpoint.

Installed as ``vllm_sab.calibrate`` (repository folder ``calibrate/``).
Entry points: :func:`calibrate` (Python) and ``sab-calibrate`` (CLI).
"""

from .models import ADAPTERS, UnsupportedArchitectureError
from .pipeline import calibrate
from .writer import OutputExistsError

__all__ = ["ADAPTERS", "OutputExistsError", "UnsupportedArchitectureError", "calibrate"]
