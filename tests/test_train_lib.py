"""The whole run: train_and_evaluate end to end on tiny built-in data, resume, sharding,
the DGR mechanism, and the entry points' errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgr_jax.models import ModelConfig, build_model, heads_apply_fn
from dgr_jax.objective import DGRConfig
from dgr_jax.penalty import heads_penalty
from dgr_jax.tasks import NYUV2, task_losses
from dgr_jax.train import init_train_state, make_train_step
from experiments import nyuv2
from experiments._bench import random_batch
from experiments.train_lib import RunConfig, train_and_evaluate

TINY = dict(backbone=18, base_width=4, stage_sizes=(1, 2, 1, 1), head_width=8, num_dummy=1)
SCENES = dict(synthetic=True, synthetic_size=(24, 32), synthetic_counts=(6, 3), batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    old = os.environ.get("DGR_JAX_CACHE")
    os.environ["DGR_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DGR_JAX_CACHE")
    else:
        os.environ["DGR_JAX_CACHE"] = old


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("dataset, network, weighting, dgr_weight", [
    ("nyuv2", "split", "uncertainty", 0.1),
    ("nyuv2", "mtan", "equal", 0.1),
    ("cityscapes", "split", "uncertainty", 0.0),
    ("multidigits", "split", "dwa", 0.1),
])
def test_train_and_evaluate_end_to_end(tmp_path, dataset, network, weighting, dgr_weight):
    extra = SCENES if dataset in ("nyuv2", "cityscapes") else dict(batch_size=16, optimizer="adam", lr=1e-3)
    config = RunConfig(dataset=dataset, network=network, weighting=weighting, dgr_weight=dgr_weight,
                       steps=2, **TINY, **extra)
    summary = train_and_evaluate(config, tmp_path, progress=False, log=lambda _: None)
    assert summary["steps"] == 2
    metrics = summary["metrics"]
    assert all(np.isfinite(v) for v in metrics.values())
    if dataset == "nyuv2":
        assert {"seg/miou", "depth/abs_err", "normal/mean_angle", "delta_m"} <= set(metrics)
    train = read_lines(tmp_path / "train.jsonl")
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["dgr/penalty"] > 0 for r in train) == (dgr_weight > 0)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "curves.png").stat().st_size > 1000
    table = (tmp_path / "results.md").read_text()
    assert "| this run:" in table and ("paper:" in table) == (dataset != "multidigits")
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_continues_exactly(tmp_path):
    config = RunConfig(dataset="nyuv2", weighting="dwa", dgr_weight=0.1, epochs=2, **TINY, **SCENES)
    whole = train_and_evaluate(config, tmp_path / "whole", progress=False, log=lambda _: None)
    stopped = train_and_evaluate(config, tmp_path / "parts", stop_after=4, progress=False, log=lambda _: None)
    assert stopped == {"stopped_at": 4}  # in the middle of the second epoch
    resumed = train_and_evaluate(config, tmp_path / "parts", resume=True, progress=False, log=lambda _: None)
    assert resumed["steps"] == whole["steps"] == 6
    for key, value in whole["metrics"].items():
        np.testing.assert_allclose(resumed["metrics"][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    losses = {r["step"]: r["loss/total"] for r in read_lines(tmp_path / "whole" / "train.jsonl")}
    resumed_losses = {r["step"]: r["loss/total"] for r in read_lines(tmp_path / "parts" / "train.jsonl")}
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed_losses[s] for s in range(1, 7)], [losses[s] for s in range(1, 7)], rtol=1e-5)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import json, sys
    import jax.numpy as jnp, numpy as np, optax
    from dgr_jax import parallel
    from dgr_jax.models import ModelConfig, build_model
    from dgr_jax.objective import DGRConfig
    from dgr_jax.tasks import NYUV2
    from dgr_jax.train import init_train_state, make_train_step
    from dgr_jax.weighting import get_method
    from experiments._bench import random_batch

    net = build_model(ModelConfig(network="split", depth=18, base_width=4, head_width=8,
                                  stage_sizes=(1, 1, 1, 1)), NYUV2)
    batch = random_batch(NYUV2, 8, 24, 32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    method = get_method("uncertainty")
    step = make_train_step(net, NYUV2, DGRConfig(weight=0.5, num_dummy=1), optimizer, method)
    results = {}
    for devices in (1, 4):
        mesh = parallel.make_mesh(devices)
        state = init_train_state(net, optimizer, jax.random.PRNGKey(0), jnp.asarray(batch["image"][:1]), 1, method, 3)
        state = parallel.replicate(state, mesh)
        jitted = parallel.jit_train_step(step, mesh)
        for _ in range(2):
            state, metrics = jitted(state, parallel.global_batch(batch, mesh))
        leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
        stats = jax.tree_util.tree_leaves(jax.device_get(state.batch_stats))
        results[devices] = dict(metrics={k: float(v) for k, v in metrics.items()},
                                params=np.concatenate([np.ravel(x) for x in leaves]).tolist(),
                                stats=np.concatenate([np.ravel(x) for x in stats]).tolist(),
                                sharding=str(parallel.global_batch(batch, mesh)["image"].sharding.spec))
    json.dump(results, sys.stdout)
""")


def test_four_device_step_equals_one_device_step():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    one, four = results["1"], results["4"]
    assert "data" in four["sharding"]
    for key, value in one["metrics"].items():
        np.testing.assert_allclose(four["metrics"][key], value, rtol=2e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(four["params"], one["params"], rtol=1e-4, atol=1e-5)
    # BatchNorm statistics are those of the global batch, not of a device's quarter.
    np.testing.assert_allclose(four["stats"], one["stats"], rtol=1e-4, atol=1e-5)


def test_dgr_lowers_the_dummy_gradient_norm():
    """Mechanism: from the same start and data, N steps with lambda > 0 leave the
    dummy sets' gradient norm lower than N steps with lambda = 0."""
    net = build_model(ModelConfig(network="split", depth=18, base_width=4, head_width=8, stage_sizes=(1, 1, 1, 1)),
                      NYUV2)
    batch = {k: jnp.asarray(v) for k, v in random_batch(NYUV2, 4, 24, 32).items()}
    batch["image"] = batch["image"].astype(jnp.float32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    start = init_train_state(net, optimizer, jax.random.PRNGKey(3), batch["image"][:1], 2)

    @jax.jit
    def dummy_norm(state):
        (features, _), _ = net.apply({"params": {"encoder": state.params["encoder"], "heads": state.params["heads"]},
                                      "batch_stats": state.batch_stats}, batch["image"], train=True,
                                     mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
        return heads_penalty(heads_apply_fn(net.heads, batch["image"].shape[1:3]), state.dummy_sets, features,
                             {t.name: batch[t.name] for t in NYUV2}, task_losses(NYUV2), unroll_sets=True)

    finals = {}
    for weight in (0.0, 1.0):
        step = jax.jit(make_train_step(net, NYUV2, DGRConfig(weight=weight, num_dummy=2), optimizer))
        state = start
        for _ in range(10):
            state, _ = step(state, batch)
        finals[weight] = float(dummy_norm(state))
    assert finals[1.0] < 0.9 * finals[0.0], finals


@pytest.mark.parametrize("argv, message", [
    ([], "no data: pass --data_dir DIR"),
    (["--data_dir", "/nonexistent/nyu"], "--data_dir /nonexistent/nyu: no such folder"),
    (["--synthetic", "--tasks", "seg,colour"], "--tasks: colour is not a task of nyuv2"),
    (["--synthetic", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--synthetic", "--dgr_weight", "-1"], "--dgr_weight must be >= 0, got -1.0"),
    (["--synthetic", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_entry_point_rejects_bad_flags_and_missing_data_in_one_line(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        nyuv2.main(argv)
    text = str(exit_info.value.code)
    assert message in text and "\n" not in text, text


def test_entry_point_bad_reference_and_bad_batch(tmp_path, capsys):
    bad = tmp_path / "ref.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="--reference .*cannot read JSON"):
        nyuv2.main(["--synthetic", "--reference", str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        nyuv2.main(["--synthetic", "--weighting", "nash"])
    assert exit_info.value.code == 2 and "invalid choice: 'nash'" in capsys.readouterr().err
