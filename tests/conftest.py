"""Test-wide JAX settings and a place for tests to report findings.

float64 is on so that reference computations can be brute force in double
precision; tests that need float32 say so explicitly. Rank promotion raises, so a
shape bug fails loudly instead of broadcasting silently.
"""

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests' programs are tiny, so their time is XLA's compile time; LLVM's optimisation
# level 0 compiles CPU programs about a quarter faster (child processes inherit it).
# Must be set before the first JAX computation initialises the backend.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# Many tests compile the same tiny step (a run, then its resume; one configuration under
# several faults), in this process or in a child. One persistent compilation cache for the
# session, shared with xdist workers and child processes through the environment, lets each
# program compile once. The first process creates it (so every CI run starts empty) and
# removes it at the end; a cache the caller set is used and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dgr_jax_test_xla_")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


_FINDINGS: list[str] = []


@pytest.fixture
def report(request):
    """Call ``report(text)`` to print ``text`` in the summary at the end of the run. The
    text travels with the test's report, so it reaches the summary from xdist workers."""
    return lambda text: request.node.user_properties.append(("finding", text))


def pytest_runtest_logreport(report):
    if report.when == "call":
        _FINDINGS.extend(value for name, value in report.user_properties if name == "finding")


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
    scenes = dataset in ("nyuv2", "cityscapes", "pascal")
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
