"""grokscope: an interpretability workbench for Grok-1's mixture-of-experts routing."""

__version__ = "0.1.0"
