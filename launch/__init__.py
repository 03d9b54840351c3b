"""Command-line entry points: parse flags, call deepseek_jax library functions."""
