"""Deprecated module name: the metrics live in `grokscope.analysis.specialization`."""

import warnings

from grokscope.analysis.specialization import *  # noqa: F401,F403
from grokscope.analysis.specialization import __all__  # noqa: F401

warnings.warn("grokscope.analysis.specialisation is deprecated: use grokscope.analysis.specialization",
              DeprecationWarning, stacklevel=2)
