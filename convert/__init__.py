"""Fewer KV heads from a trained model: K/V pooling (heads.py) after optional grouping and
alignment fitted on calibration data (align.py); `python -m convert` (command.py)."""
