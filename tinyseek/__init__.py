"""tinyseek: the DeepSeek-R1 low-cost training recipe, end to end, at laptop scale."""

__version__ = "0.1.0"
