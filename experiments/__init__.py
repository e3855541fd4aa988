"""Thin entry points: parse flags, build data and models, call dgr_jax."""
