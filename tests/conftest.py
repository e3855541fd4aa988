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


def tiny_config(dataset="nyuv2", **changes):
    """A ``RunConfig`` of tiny size: ResNet-18 with base width 4, heads of width 8, one
    dummy set, built-in data of 24x32 (6 train / 3 val scenes), batch 2. ``changes`` go
    through ``RunConfig.replace`` (``train={"steps": 2}``, ``dgr={"weight": 0.1}``, ...)."""
    from dgr_jax.models import ModelConfig
    from dgr_jax.objective import DGRConfig
    from experiments.config import DataConfig, RunConfig, TrainConfig
    from experiments.datasets import DATASETS

    spec = DATASETS[dataset]
    scenes = dataset in ("nyuv2", "cityscapes")
    config = RunConfig(
        dataset=dataset,
        model=ModelConfig(
            network=spec.networks[0],
            backbone="resnet18",
            base_width=4,
            stage_sizes=(1, 2, 1, 1),
            head_width=8,
        ),
        dgr=DGRConfig(num_dummy=1),
        train=TrainConfig(**{**spec.recipe, "batch_size": 2 if scenes else 16}),
        data=DataConfig(
            synthetic=scenes or dataset == "utkface",
            synthetic_size=(24, 32),
            synthetic_counts=(6, 3),
        ),
    )
    return config.replace(**changes)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A fresh DGR_JAX_CACHE for the module's generated data."""
    import os

    old = os.environ.get("DGR_JAX_CACHE")
    os.environ["DGR_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["DGR_JAX_CACHE"]
    if old is None:
        os.environ.pop("DGR_JAX_CACHE")
    else:
        os.environ["DGR_JAX_CACHE"] = old
