"""Attention backends: rotary, KV write (+ key summaries) and attention of every layer, one
implementation per kernel family, chosen once at start-up (backends/cuda/attention/base.py)."""
