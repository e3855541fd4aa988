"""Test-wide JAX settings and a place for tests to report findings.

float64 is on so that reference computations can be brute force in double
precision; tests that need float32 say so explicitly. Rank promotion raises, so a
shape bug fails loudly instead of broadcasting silently.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

_FINDINGS: list[str] = []


@pytest.fixture
def report():
    """Call ``report(text)`` to print ``text`` in the summary at the end of the run."""
    return _FINDINGS.append


def pytest_terminal_summary(terminalreporter):
    if _FINDINGS:
        terminalreporter.section("findings")
        for text in _FINDINGS:
            terminalreporter.write_line(text)
