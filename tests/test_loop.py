"""The whole run: train_and_evaluate end to end on tiny built-in data, resume, sharding,
the DGR mechanism, the optimiser's recipe, and the entry points' errors."""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from dgr_jax.models import ModelConfig, build_model, heads_apply_fn
from dgr_jax.objective import DGRConfig
from dgr_jax.penalty import heads_penalty
from dgr_jax.tasks import NYUV2, task_losses
from dgr_jax.train import init_train_state, make_train_step
from experiments import nyuv2
from experiments._bench import random_batch
from experiments.config import MethodConfig, TrainConfig
from experiments.loop import train_and_evaluate

pytestmark = pytest.mark.usefixtures("private_cache")


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "dataset, network, weighting, dgr_weight",
    [
        ("nyuv2", "split", "uncertainty", 0.1),
        ("nyuv2", "mtan", "equal", 0.0),
        ("cityscapes", "split", "uncertainty", 0.0),
        ("multidigits", "classifier", "dwa", 0.1),
    ],
)
def test_train_and_evaluate_end_to_end(tmp_path, dataset, network, weighting, dgr_weight):
    config = tiny_config(
        dataset,
        model={"network": network},
        method=MethodConfig(weighting),
        dgr={"weight": dgr_weight},
        train={"steps": 2},
    )
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


@pytest.mark.parametrize(
    "dataset, weighting",
    [("nyuv2", "dwa")] + [("multidigits", m) for m in ("autol", "pcgrad", "nash_mtl", "famo")],
)
def test_resume_continues_exactly(tmp_path, dataset, weighting):
    """DWA's loss history, Auto-lambda's weights (and its held-out pass), PCGrad's key,
    Nash-MTL's warm start, FAMO's logits: all in the checkpoint."""
    # nyuv2: 3 steps an epoch, the stop in the second; multidigits: 6 steps of the first.
    train = {"epochs": 2} if dataset == "nyuv2" else {"steps": 6}
    config = tiny_config(dataset, method=MethodConfig(weighting), dgr={"weight": 0.1}, train=train)
    whole = train_and_evaluate(config, tmp_path / "whole", progress=False, log=lambda _: None)
    stopped = train_and_evaluate(
        config, tmp_path / "parts", stop_after=4, progress=False, log=lambda _: None
    )
    assert stopped == {"stopped_at": 4}
    resumed = train_and_evaluate(
        config, tmp_path / "parts", resume=True, progress=False, log=lambda _: None
    )
    assert resumed["steps"] == whole["steps"] == 6
    for key, value in whole["metrics"].items():
        np.testing.assert_allclose(
            resumed["metrics"][key], value, rtol=1e-5, atol=1e-6, err_msg=key
        )
    losses = {r["step"]: r["loss/total"] for r in read_lines(tmp_path / "whole" / "train.jsonl")}
    resumed_losses = {
        r["step"]: r["loss/total"] for r in read_lines(tmp_path / "parts" / "train.jsonl")
    }
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [resumed_losses[s] for s in range(1, 7)], [losses[s] for s in range(1, 7)], rtol=1e-5
    )


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
    from dgr_jax.methods import get_method
    from experiments._bench import random_batch

    net = build_model(ModelConfig(network="split", backbone="resnet18", base_width=4, head_width=8,
                                  stage_sizes=(1, 1, 1, 1)), NYUV2)
    batch = random_batch(NYUV2, 8, 24, 32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    method = get_method("uncertainty")
    step = make_train_step(net, NYUV2, DGRConfig(weight=0.5, num_dummy=1), optimizer, method)
    results = {}
    common = None
    start = jax.device_get(jax.jit(lambda key: init_train_state(
        net, optimizer, key, jnp.asarray(batch["image"][:1]), 1, method, 3))(jax.random.PRNGKey(0)))
    for devices in (1, 4):
        mesh = parallel.make_mesh(devices)
        state = parallel.replicate(start, mesh)
        jitted = parallel.jit_train_step(step, mesh)
        for _ in range(2):
            state, metrics = jitted(state, parallel.global_batch(batch, mesh))
        # A short last batch of 6 on 4 devices runs replicated, with the same numbers (from
        # the same state: the one-device state after two steps).
        common = jax.device_get(state) if common is None else common
        short = parallel.global_batch({k: v[:6] for k, v in batch.items()}, mesh)
        _, short_metrics = jitted(parallel.replicate(common, mesh), short)
        leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
        stats = jax.tree_util.tree_leaves(jax.device_get(state.batch_stats))
        results[devices] = dict(metrics={k: float(v) for k, v in metrics.items()},
                                params=np.concatenate([np.ravel(x) for x in leaves]).tolist(),
                                stats=np.concatenate([np.ravel(x) for x in stats]).tolist(),
                                sharding=str(parallel.global_batch(batch, mesh)["image"].sharding.spec),
                                short_sharding=str(short["image"].sharding.spec),
                                short_metrics={k: float(v) for k, v in short_metrics.items()})
    json.dump(results, sys.stdout)
""")


def test_four_device_step_equals_one_device_step():
    # At conftest's XLA optimisation level 0 (compiles about twice as fast here) the
    # devices' partial sums differ from one device's by up to 3.3e-4 relative on the
    # encoder's gradient norm and 5e-4 on a BatchNorm statistic (float32).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    one, four = results["1"], results["4"]
    assert "data" in four["sharding"] and "data" not in four["short_sharding"]
    for key, value in one["metrics"].items():
        np.testing.assert_allclose(four["metrics"][key], value, rtol=1e-3, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(
            four["short_metrics"][key], one["short_metrics"][key], rtol=1e-3, atol=1e-6, err_msg=key
        )
    # float32 reductions in another order, amplified where the L1 losses' kinks flip a sign:
    # 2e-5 relative over the whole vector, 5e-5 at worst on parameters of size ~0.1. A
    # device-local BatchNorm or loss would be off by orders of magnitude more.
    four_params, one_params = np.asarray(four["params"]), np.asarray(one["params"])
    assert np.linalg.norm(four_params - one_params) / np.linalg.norm(one_params) < 1e-4
    np.testing.assert_allclose(four_params, one_params, rtol=1e-4, atol=1e-4)
    # BatchNorm statistics are those of the global batch, not of a device's quarter.
    np.testing.assert_allclose(four["stats"], one["stats"], rtol=1e-3, atol=1e-5)


def test_dgr_lowers_the_dummy_gradient_norm():
    """Mechanism: from the same start and data, N steps with lambda > 0 leave the
    dummy sets' gradient norm lower than N steps with lambda = 0."""
    net = build_model(
        ModelConfig(
            network="split",
            backbone="resnet18",
            base_width=4,
            head_width=8,
            stage_sizes=(1, 1, 1, 1),
        ),
        NYUV2,
    )
    batch = {k: jnp.asarray(v) for k, v in random_batch(NYUV2, 4, 24, 32).items()}
    batch["image"] = batch["image"].astype(jnp.float32)
    optimizer = optax.sgd(0.05, momentum=0.9)
    start = init_train_state(net, optimizer, jax.random.PRNGKey(3), batch["image"][:1], 2)

    @jax.jit
    def dummy_norm(state):
        (features, _), _ = net.apply(
            {
                "params": {"encoder": state.params["encoder"], "heads": state.params["heads"]},
                "batch_stats": state.batch_stats,
            },
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        return heads_penalty(
            heads_apply_fn(net.heads, batch["image"].shape[1:3]),
            state.dummy_sets,
            features,
            {t.name: batch[t.name] for t in NYUV2},
            task_losses(NYUV2),
            unroll_sets=True,
        )

    finals = {}
    for weight in (0.0, 1.0):
        step = jax.jit(
            make_train_step(net, NYUV2, DGRConfig(weight=weight, num_dummy=2), optimizer)
        )
        state = start
        for _ in range(
            20
        ):  # the L1 normal loss (the original's) keeps part of the norm: 10 steps -6%, 20 -15%
            state, _ = step(state, batch)
        finals[weight] = float(dummy_norm(state))
    assert finals[1.0] < 0.9 * finals[0.0], finals


def test_learning_rate_is_cosine_stepped_once_per_epoch_as_cosine_annealing_lr():
    """torch's CosineAnnealingLR(T_max=E), stepped after each epoch: epoch e trains at
    lr (1 + cos(pi e / E)) / 2 for every one of its steps."""
    from experiments.loop import learning_rate_schedule

    schedule = learning_rate_schedule(
        TrainConfig(lr=0.1, epochs=4), steps_per_epoch=3, total_steps=12
    )
    for count in range(12):
        epoch = count // 3
        assert float(schedule(count)) == pytest.approx(
            0.05 * (1 + math.cos(math.pi * epoch / 4)), rel=1e-6
        ), count
    assert float(schedule(3)) == pytest.approx(
        0.05 * (1 + math.cos(math.pi / 4)), rel=1e-6
    )  # an epoch boundary
    per_step = learning_rate_schedule(
        TrainConfig(lr=0.1, lr_schedule="step"), steps_per_epoch=3, total_steps=12
    )
    assert float(per_step(1)) == pytest.approx(0.05 * (1 + math.cos(math.pi / 12)), rel=1e-6)


def test_uncertainty_log_variances_are_weight_decayed_as_in_the_original():
    from experiments.loop import make_optimizer

    params = {
        "encoder": jnp.ones(2),
        "heads": jnp.ones(1),
        "method": {"log_var": jnp.full(3, -0.7)},
    }
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    for args, decayed in ((None, True), ({"weight_decay": False}, False)):
        method = MethodConfig("uncertainty", tuple((args or {}).items())).build()
        optimizer = make_optimizer(TrainConfig(lr=0.1, weight_decay=1e-4), 10, 10, method)
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        # SGD, first step: update = -lr * (grad + wd * param).
        np.testing.assert_allclose(
            updates["method"]["log_var"], -0.1 * 1e-4 * -0.7 if decayed else 0.0, rtol=1e-6
        )
        np.testing.assert_allclose(updates["encoder"], -0.1 * 1e-4, rtol=1e-6)


def test_short_last_batch_is_kept_by_default_and_dropped_on_request(tmp_path):
    config = tiny_config(train={"epochs": 1}, data={"synthetic_counts": (5, 3)})
    kept = config.spec.open(config)
    assert [len(b["index"]) for b in kept.train_epoch(0, 0)] == [2, 2, 1]
    dropping = config.replace(data={"drop_last": True})
    assert len(dropping.spec.open(dropping).train_epoch(0, 0)) == 2
    summary = train_and_evaluate(config, tmp_path, progress=False, log=lambda _: None)
    assert summary["steps"] == 3 and [r["step"] for r in read_lines(tmp_path / "train.jsonl")] == [
        1,
        2,
        3,
    ]
    assert set(summary["metrics_paper"]) == {
        "seg/miou",
        "depth/abs_err",
        "normal/mean_angle",
        "delta_m",
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no data: pass --data_dir DIR"),
        (["--data_dir", "/nonexistent/nyu"], "--data_dir /nonexistent/nyu: no such folder"),
        (["--synthetic", "--tasks", "seg,colour"], "--tasks: colour is not a task of nyuv2"),
        (["--synthetic", "--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--synthetic", "--dgr_weight", "-1"], "--dgr_weight must be >= 0, got -1.0"),
        (["--synthetic", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--synthetic", "--head_dropout", "1.5"], "--head_dropout must be in [0, 1), got 1.5"),
        (
            ["--synthetic", "--weighting", "uncertainty", "--method_args", "temperature=2"],
            "--method_args: uncertainty has no argument 'temperature'; its arguments: initial_log_var=-0.7",
        ),
        (
            ["--synthetic", "--weighting", "uncertainty", "--method_args", "scale=big"],
            "--method_args: scale='big' is not a float",
        ),
        (
            ["--synthetic", "--weighting", "dwa", "--method_args", "temperature"],
            "--method_args: 'temperature' is not KEY=VALUE",
        ),
        (
            ["--synthetic", "--weighting", "dwa", "--method_args", "temperature=0"],
            "--method_args: dwa: temperature must be > 0",
        ),
    ],
)
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
