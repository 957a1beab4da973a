"""Data preparation tools, run as ``python -m data_tools.<tool>``."""
