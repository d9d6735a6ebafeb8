"""blindtune: adapt a proprietary LLM to private data without either side revealing its assets."""

__version__ = "0.1.0"
