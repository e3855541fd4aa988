"""MTL methods: each against a hand computation, and the interface through the library's
own ``per_task_gradients`` and ``train.make_train_step``."""

import json
import math
import os
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgr_jax.methods import (
    METHODS,
    DWAState,
    MTLMethod,
    NoState,
    UncertaintyParams,
    dwa,
    equal,
    get_method,
    per_task_gradients,
    uncertainty,
    weighted_sum,
)

F64 = jnp.float64


def test_equal_sums_losses_with_unit_weights():
    method = equal()
    params, state = method.init(3)
    losses = jnp.array([0.5, 2.0, 1.25], F64)
    total, weights = method.loss(params, losses, state)
    assert float(total) == 3.75
    np.testing.assert_array_equal(weights, np.ones(3))
    assert not method.needs_task_grads


def _feed_epoch(method, state, step_losses):
    for losses in step_losses:
        state = method.update(state, jnp.asarray(losses, F64))
    return method.end_epoch(state)


def test_dwa_weights_follow_epoch_average_loss_ratios():
    method = dwa()  # temperature 2
    params, state = method.init(3, F64)
    losses = jnp.array([1.0, 1.0, 1.0], F64)
    # Epochs 0 and 1: weights 1, whatever the losses.
    np.testing.assert_array_equal(method.loss(params, losses, state)[1], np.ones(3))
    state = _feed_epoch(method, state, [[1.0, 3.0, 0.25], [1.0, 1.0, 0.75]])  # average [1, 2, 0.5]
    assert isinstance(state, DWAState)
    np.testing.assert_array_equal(state.epoch_losses[1], [1.0, 2.0, 0.5])
    np.testing.assert_array_equal(method.loss(params, losses, state)[1], np.ones(3))
    state = _feed_epoch(method, state, [[0.8, 1.0, 0.6]])
    assert int(state.epoch) == 2

    # Epoch 2: r = L(1) / L(0) = [0.8, 0.5, 1.2]; w = 3 exp(r/2) / sum exp(r/2).
    e = [math.exp(0.8 / 2), math.exp(0.5 / 2), math.exp(1.2 / 2)]
    expected = [3 * v / sum(e) for v in e]
    total, weights = method.loss(params, jnp.array([2.0, 1.0, 0.5], F64), state)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    np.testing.assert_allclose(
        total, 2.0 * expected[0] + expected[1] + 0.5 * expected[2], rtol=1e-12
    )
    # Weights are constants for the gradient.
    grad = jax.grad(lambda values: method.loss(params, values, state)[0])(losses)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)

    # end_epoch rolls the history and resets the running mean.
    state = method.update(state, jnp.array([0.4, 1.0, 0.3], F64))
    state = method.update(state, jnp.array([0.4, 0.8, 0.9], F64))
    assert int(state.num_examples) == 2
    state = method.end_epoch(state)
    np.testing.assert_allclose(state.epoch_losses, [[0.8, 1.0, 0.6], [0.4, 0.9, 0.6]], rtol=1e-12)
    np.testing.assert_array_equal(state.loss_sum, np.zeros(3))
    assert int(state.num_examples) == 0 and int(state.epoch) == 3
    e = [math.exp(0.5 / 2), math.exp(0.9 / 2), math.exp(1.0 / 2)]
    np.testing.assert_allclose(
        method.loss(params, losses, state)[1], [3 * v / sum(e) for v in e], rtol=1e-12
    )


def test_uncertainty_defaults_are_the_original_codes_form_from_minus_0_7():
    """auto-lambda / the DGR repository: total = sum_t l_t / (2 exp(w_t)) + w_t / 2, with
    logsigma = torch.tensor([-0.7] * T) weight-decayed in the same SGD group."""
    method = uncertainty()
    params, state = method.init(3, F64)
    assert isinstance(params, UncertaintyParams)
    np.testing.assert_array_equal(params.log_var, np.full(3, -0.7))
    assert method.decay_params
    losses = jnp.array([0.3, 1.7, 4.0], F64)
    total, weights = method.loss(params, losses, state)
    # By hand at w = -0.7: 1 / (2 e^-0.7) = e^0.7 / 2 = 2.0137527... / 2
    np.testing.assert_allclose(weights, np.full(3, 1.0068763537352383), rtol=1e-14)
    np.testing.assert_allclose(total, 1.0068763537352383 * 6.0 + 3 * (-0.35), rtol=1e-14)
    w = np.array([-0.5, 0.2, 1.1])
    total, weights = method.loss(UncertaintyParams(jnp.asarray(w)), losses, state)
    values = np.asarray(losses)
    np.testing.assert_allclose(total, np.sum(values / (2 * np.exp(w)) + w / 2), rtol=1e-14)
    np.testing.assert_allclose(weights, 1 / (2 * np.exp(w)), rtol=1e-14)


def test_uncertainty_kendall_form_total_gradient_and_optimum_match_closed_form():
    method = get_method("uncertainty", scale=1.0, initial_log_var=0.0, weight_decay=False)
    params, state = method.init(3, F64)
    np.testing.assert_array_equal(params.log_var, np.zeros(3))
    assert not method.decay_params
    losses = jnp.array([0.3, 1.7, 4.0], F64)
    log_var = jnp.array([-0.5, 0.2, 1.1], F64)
    total, weights = method.loss(UncertaintyParams(log_var), losses, state)
    s, loss_values = np.asarray(log_var), np.asarray(losses)
    np.testing.assert_allclose(total, np.sum(np.exp(-s) * loss_values + s), rtol=1e-14)
    np.testing.assert_allclose(weights, np.exp(-s), rtol=1e-14)

    def total_of(p, values):
        return method.loss(p, values, state)[0]

    grad_s, grad_l = jax.grad(total_of, argnums=(0, 1))(UncertaintyParams(log_var), losses)
    np.testing.assert_allclose(grad_s.log_var, -np.exp(-s) * loss_values + 1.0, rtol=1e-14)
    np.testing.assert_allclose(grad_l, np.exp(-s), rtol=1e-14)

    # s* = log l: the gradient vanishes there and the total is larger on both sides.
    optimum = UncertaintyParams(jnp.log(losses))
    np.testing.assert_allclose(jax.grad(total_of)(optimum, losses).log_var, np.zeros(3), atol=1e-14)
    for shift in (-0.1, 0.1):
        assert float(total_of(UncertaintyParams(jnp.log(losses) + shift), losses)) > float(
            total_of(optimum, losses)
        )


def test_dwa_epoch_average_weighs_a_short_last_batch_by_its_size():
    """The original's running mean: r = n / (n + b/B), m = r m + (1 - r) loss, per step."""
    method = dwa()
    _, state = method.init(2, F64)
    steps = [
        ([1.0, 4.0], 4),
        ([3.0, 2.0], 4),
        ([0.5, 9.0], 2),
    ]  # batches of 4, 4 and a short one of 2
    running, counter = np.zeros(2), 0
    for losses, size in steps:
        state = method.update(state, jnp.asarray(losses, F64), size)
        r = counter / (counter + size / 4)
        running = r * running + (1 - r) * np.asarray(losses)
        counter += 1
    state = method.end_epoch(state)
    np.testing.assert_allclose(state.epoch_losses[1], running, rtol=1e-14)
    np.testing.assert_allclose(running, [(4 + 12 + 1) / 10, (16 + 8 + 18) / 10], rtol=1e-14)


def test_weighted_sum_combine_matches_numpy():
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 2))}
    weights = np.array([0.5, 1.5, -2.0])
    combined, state = weighted_sum(
        jax.tree_util.tree_map(jnp.asarray, grads),
        jnp.ones(3, F64),
        jnp.asarray(weights),
        {"kept": jnp.zeros(())},
    )
    for name, g in grads.items():
        np.testing.assert_allclose(combined[name], np.einsum("t,t...->...", weights, g), rtol=1e-12)
    assert set(state) == {"kept"}
    with pytest.raises(ValueError, match="leading axis"):
        weighted_sum({"w": jnp.zeros((2, 4))}, jnp.ones(3), jnp.ones(3), {})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_pure_and_jits_once(name):
    method = get_method(name)
    shared = {"shared": {"g": jnp.zeros(2, jnp.float32)}} if method.shared_state else {}
    params, state = method.init(3, **shared)  # float32 by default, as in training
    assert all(
        leaf.dtype in (jnp.float32, jnp.int32, jnp.uint32)  # uint32: a PRNG key
        for leaf in jax.tree_util.tree_leaves((params, state))
    )
    losses = jnp.array([1.0, 2.0, 3.0], jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, losses):
        total, weights = method.loss(params, losses, state)
        combined, state = method.combine(
            {"g": jnp.ones((3, 2), jnp.float32)}, losses, weights, state
        )
        return total, weights, combined, method.update(state, losses)

    chex.clear_trace_counter()
    for _ in range(3):
        total, weights, combined, state = step(params, state, losses)
        state = jax.jit(method.end_epoch)(state)
    assert total.dtype == jnp.float32 and weights.shape == (3,)
    if not method.needs_task_grads:
        np.testing.assert_allclose(combined["g"], np.full(2, float(jnp.sum(weights))), rtol=1e-6)
    assert np.all(np.isfinite(combined["g"]))  # identical task gradients are no special case
    chex.assert_trees_all_close(
        jax.jit(method.loss)(params, losses, state), method.loss(params, losses, state)
    )


def test_registry_and_argument_checks():
    # The registry names the issue tracker fixed (other code depends on them).
    paper = {"equal", "dwa", "uncertainty", "pcgrad", "cagrad", "imtl", "nash_mtl", "graddrop"}
    paper |= {"autol"}
    modern = {"mgda", "rlw", "gradnorm", "famo", "aligned_mtl", "upgrad", "db_mtl", "gradvac"}
    assert paper | modern <= set(METHODS)
    with pytest.raises(ValueError, match=r"^unknown MTL method 'pc_grad'; valid: equal, dwa, "):
        get_method("pc_grad")
    with pytest.raises(ValueError, match="temperature"):
        get_method("dwa", temperature=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        uncertainty().init(0)
    params, state = dwa().init(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        dwa().loss(params, jnp.ones(2), state)


@pytest.mark.parametrize(
    "name, argument, value, requirement",
    [
        ("cagrad", "c", -0.1, ">= 0"),
        ("cagrad", "rescale", 3, "0, 1 or 2"),
        ("cagrad", "iterations", 0, "an integer >= 1"),
        ("mgda", "iterations", 2.5, "an integer >= 1"),
        ("mgda", "level", "features", "'representation' or 'parameters'"),
        ("nash_mtl", "max_norm", -1.0, ">= 0"),
        ("nash_mtl", "iterations", 0, "an integer >= 1"),
        ("upgrad", "iterations", -3, "an integer >= 1"),
        ("gradvac", "beta", 1.5, "in [0, 1]"),
        ("graddrop", "leak", -0.5, "in [0, 1]"),
        ("gradnorm", "alpha", -1.0, ">= 0"),
        ("gradnorm", "lr", 0.0, "> 0"),
        ("db_mtl", "beta", 1.0, "in [0, 1)"),
        ("db_mtl", "beta_sigma", -0.5, ">= 0"),
        ("autol", "lr", 0.0, "> 0"),
        ("autol", "initial_weight", 0.0, "> 0"),
        ("autol", "hypergradient", "second_order", "one of"),
        ("famo", "gamma", -0.01, ">= 0"),
        ("famo", "w_lr", 0.0, "> 0"),
        ("famo", "max_norm", -1.0, ">= 0"),
    ],
)
def test_bad_hyperparameters_name_the_method_and_argument(name, argument, value, requirement):
    with pytest.raises(ValueError) as error:
        get_method(name, **{argument: value})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: {argument} must be ") and requirement in message, message
    assert message.endswith(f"got {value!r}") or message.endswith(f"got {value}"), message


# --- The interface through the library's step ----------------------------------------


def test_per_task_gradients_equal_separate_gradients():
    """One forward, T + 1 VJPs: each row against its own jax.grad (float64 toy model)."""
    rng = np.random.default_rng(1)
    x, targets = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(6, 3)))
    params = {
        "encoder": jnp.asarray(rng.normal(size=(4, 5))),
        "heads": jnp.asarray(rng.normal(size=(5, 3))),
    }

    def objective(p):
        features = jnp.tanh(x @ p["encoder"])
        losses = jnp.mean(jnp.square(features @ p["heads"] - targets), axis=0)
        return (losses, 0.7 * jnp.sum(jnp.square(p["encoder"]))), "aux"

    losses, extra, task_grads, extra_grads, aux = per_task_gradients(objective, params, 3)
    assert aux == "aux" and task_grads["encoder"].shape == (3, 4, 5)
    for t in range(3):
        want = jax.grad(lambda p, t=t: objective(p)[0][0][t])(params)
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda g, t=t: g[t], task_grads), want, rtol=1e-12
        )
    chex.assert_trees_all_close(
        extra_grads, jax.grad(lambda p: objective(p)[0][1])(params), rtol=1e-12
    )
    np.testing.assert_allclose(extra, 0.7 * np.sum(np.square(params["encoder"])), rtol=1e-12)
    # Without the extra term's VJP (DGR off): the same task rows, zeros for the extra.
    _, _, without, zeros, _ = per_task_gradients(objective, params, 3, with_extra=False)
    chex.assert_trees_all_close(without, task_grads, rtol=1e-12)
    assert all(not np.any(z) for z in jax.tree_util.tree_leaves(zeros))
    with pytest.raises(ValueError, match=r"task losses of shape \(3,\), expected \(2,\)"):
        per_task_gradients(objective, params, 2)


@pytest.fixture(scope="module")
def tiny_classifier():
    from dgr_jax.models import ModelConfig, build_model
    from dgr_jax.tasks import MULTIDIGITS
    from experiments._bench import random_batch

    net = build_model(
        ModelConfig(
            network="classifier",
            backbone="resnet18",
            base_width=4,
            stage_sizes=(1, 1, 1, 1),
            classifier_hidden=8,
        ),
        MULTIDIGITS,
    )
    batch = {k: jnp.asarray(v) for k, v in random_batch(MULTIDIGITS, 6, 12, 24).items()}
    return net, MULTIDIGITS, batch


@pytest.mark.parametrize("name", sorted(n for n in METHODS if not get_method(n).needs_task_grads))
def test_cheap_path_equals_task_gradient_path_in_the_train_step(tiny_classifier, name):
    """By linearity, one gradient of the weighted total (the cheap path) equals
    weighted_sum of the per-task gradients plus DGR's (the gradient-method path), through
    ``make_train_step`` itself, for every loss-weighting method."""
    import optax

    from dgr_jax.objective import DGRConfig
    from dgr_jax.train import init_train_state, make_train_step

    net, tasks, batch = tiny_classifier
    method = get_method(name)
    dgr = DGRConfig(weight=0.4, num_dummy=2)
    optimizer = optax.sgd(1.0)
    state = init_train_state(
        net, optimizer, jax.random.PRNGKey(0), batch["image"], 2, method, len(tasks)
    )
    state = jax.tree_util.tree_map(
        lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    if name == "uncertainty":
        state = state.replace(
            params={**state.params, "method": UncertaintyParams(jnp.array([0.3, -0.4], F64))}
        )
    if name == "dwa":  # weights that are not all 1
        state = state.replace(
            method_state=DWAState(
                jnp.array([[1.0, 2.0], [0.8, 1.0]], F64),
                jnp.zeros(2, F64),
                jnp.zeros((), jnp.int32),
                jnp.full((), 2, jnp.int32),
            )
        )
    cheap, cheap_metrics = make_train_step(net, tasks, dgr, optimizer, method)(state, batch)
    full, _ = make_train_step(net, tasks, dgr, optimizer, method._replace(needs_task_grads=True))(
        state, batch
    )
    chex.assert_trees_all_close(cheap.params, full.params, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(cheap.method_state, full.method_state)
    if name != "equal":  # the weights are not all 1, so this test can tell weighted from plain sums
        weights = np.array([float(cheap_metrics[f"weight/{t.name}"]) for t in tasks])
        assert np.max(np.abs(weights - 1.0)) > 0.05


def test_representation_level_sum_equals_the_cheap_path(tiny_classifier):
    """A representation-level method that sums the per-task gradients of the shared
    features, pulled back through the encoder once with DGR's, makes the same update as
    one gradient of the total (the chain rule), through ``make_train_step``."""
    import optax

    from dgr_jax.objective import DGRConfig
    from dgr_jax.train import init_train_state, make_train_step

    net, tasks, batch = tiny_classifier
    method = get_method("uncertainty")
    dgr = DGRConfig(weight=0.4, num_dummy=1)
    optimizer = optax.sgd(1.0)
    state = init_train_state(
        net, optimizer, jax.random.PRNGKey(0), batch["image"], 1, method, len(tasks)
    )
    state = jax.tree_util.tree_map(
        lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    state = state.replace(
        params={**state.params, "method": UncertaintyParams(jnp.array([0.3, -0.4], F64))}
    )
    cheap, _ = make_train_step(net, tasks, dgr, optimizer, method)(state, batch)
    on_features = method._replace(needs_task_grads=True, level="representation")
    full, _ = make_train_step(net, tasks, dgr, optimizer, on_features)(state, batch)
    chex.assert_trees_all_close(cheap.params, full.params, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(cheap.batch_stats, full.batch_stats, rtol=1e-10, atol=1e-12)


class ProbeState(NamedTuple):
    task_grads: Any  # what combine received, kept to compare with brute force


def probe_method(head_weights):
    """A gradient method that keeps the per-task encoder gradients it is handed (in its
    state), combines them by their plain sum and weighs head t by ``head_weights[t]``."""

    def init(num_tasks, dtype=jnp.float32, shared=None):
        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros((num_tasks,) + x.shape, x.dtype), shared)
        return NoState(), ProbeState(zeros)

    def combine(task_grads, task_losses, weights, state):
        return weighted_sum(task_grads, task_losses, weights, state)[0], ProbeState(task_grads)

    return MTLMethod(
        init=init,
        loss=lambda params, losses, state: (jnp.sum(losses), jnp.ones_like(losses)),
        combine=combine,
        needs_task_grads=True,
        shared_state=True,
        head_weights=lambda state, weights: jnp.asarray(head_weights, weights.dtype),
    )


@pytest.mark.parametrize("network, dgr_weight", [("split", 0.4), ("mtan", 0.0)])
def test_gradient_method_step_gets_each_tasks_exact_gradient(network, dgr_weight):
    """The step's per-task encoder gradients (one heads backward on per-task copies of the
    features, then T encoder VJPs) against brute force: ``jax.grad`` of each task's loss
    on the whole model, in float64; each head's update is its own task's gradient times
    its head weight, and DGR's gradient is added to the combination. On NYUv2's tasks
    (the normals' rsqrt among them): Split with DGR, MTAN (per-task features) without."""
    import optax

    from dgr_jax.models import ModelConfig, build_model
    from dgr_jax.objective import DGRConfig, task_losses_and_penalty
    from dgr_jax.tasks import NYUV2
    from dgr_jax.train import init_train_state, make_train_step
    from experiments._bench import random_batch

    sizes = (1, 2, 1, 1) if network == "mtan" else (1, 1, 1, 1)  # MTAN's stage 2 needs 2
    config = ModelConfig(
        network=network, backbone="resnet18", base_width=4, head_width=4, stage_sizes=sizes
    )
    net = build_model(config, NYUV2)
    batch = {k: jnp.asarray(v) for k, v in random_batch(NYUV2, 2, 16, 24).items()}
    head_weights = [0.5, 2.0, -1.0]
    method = probe_method(head_weights)
    dgr = DGRConfig(weight=dgr_weight, num_dummy=1)

    @jax.jit
    def init(key):  # jitted: Flax's eager init of MTAN takes tens of seconds
        state = init_train_state(net, optax.sgd(1.0), key, batch["image"], 1, method, 3)
        return jax.tree_util.tree_map(
            lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
        )

    state = init(jax.random.PRNGKey(0))
    new, _ = jax.jit(make_train_step(net, NYUV2, dgr, optax.sgd(1.0), method))(state, batch)

    model = {"encoder": state.params["encoder"], "heads": state.params["heads"]}
    rng = jax.random.split(state.rng)[1]

    def objective(p, dgr):
        losses, penalty, stats = task_losses_and_penalty(
            net, NYUV2, dgr, p, state.batch_stats, state.dummy_sets, batch, rng
        )
        return losses, dgr.weight * penalty, stats

    @jax.jit
    def brute_force(p):  # one forward of the whole model, a VJP per task and one for DGR
        def whole(p):
            losses, penalty, stats = objective(p, dgr)
            return (losses, penalty), stats

        _, _, rows, dgr_grad, stats = per_task_gradients(whole, p, len(NYUV2))
        return (
            [jax.tree_util.tree_map(lambda g, t=t: g[t], rows) for t in range(3)],
            dgr_grad,
            stats,
        )

    brute, dgr_grad, stats = brute_force(model)
    assert float(optax.tree.norm(dgr_grad["heads"])) == 0.0  # the dummy sets, not the heads
    rows = new.method_state.task_grads
    for t in range(len(NYUV2)):
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda g, t=t: g[t], rows),
            brute[t]["encoder"],
            rtol=1e-9,
            atol=1e-12,
        )
    expected_encoder = jax.tree_util.tree_map(
        lambda p, d, *g: p - (sum(g) + d),
        model["encoder"],
        dgr_grad["encoder"],
        *(b["encoder"] for b in brute),
    )
    chex.assert_trees_all_close(new.params["encoder"], expected_encoder, rtol=1e-9, atol=1e-12)
    for t, task in enumerate(NYUV2):
        chex.assert_trees_all_close(
            new.params["heads"][task.name],
            jax.tree_util.tree_map(
                lambda p, g, w=head_weights[t]: p - w * g,
                model["heads"][task.name],
                brute[t]["heads"][task.name],
            ),
            rtol=1e-9,
            atol=1e-12,
        )
    chex.assert_trees_all_close(new.batch_stats, stats, rtol=1e-9, atol=1e-12)


def test_autol_weighted_sum_in_the_step_equals_the_padded_task_gradients(
    tiny_classifier, monkeypatch
):
    """The step hands Auto-lambda ``sum_t w_t g_t`` without the zero rows of the heads'
    per-task gradients; the same step from the padded rows (``task_grads``) gives the
    same hypergradient, weights and update (float64)."""
    import optax

    from dgr_jax import train
    from dgr_jax.objective import DGRConfig

    net, tasks, batch = tiny_classifier
    batch = with_heldout(batch)
    method = get_method("autol", lr=0.1)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = train.init_train_state(
        net, optimizer, jax.random.PRNGKey(0), batch["image"], 1, method, len(tasks)
    )
    state = jax.tree_util.tree_map(
        lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
    )
    dgr = DGRConfig(weight=0.2, num_dummy=1)
    fast, _ = train.make_train_step(net, tasks, dgr, optimizer, method)(state, batch)

    def padded(weights, task_encoder, heads_grads, tasks):
        rows = {"encoder": task_encoder, "heads": train._per_task_head_grads(heads_grads, tasks)}
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), rows)

    monkeypatch.setattr(train, "_weighted_model_grads", padded)
    slow, _ = train.make_train_step(net, tasks, dgr, optimizer, method)(state, batch)
    assert float(jnp.max(jnp.abs(fast.method_state.hypergradient))) > 0
    chex.assert_trees_all_close(fast.method_state, slow.method_state, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(fast.params, slow.params, rtol=1e-10, atol=1e-14)


def with_heldout(batch):
    """The batch with a held-out batch (here: the examples reversed) under heldout/ keys."""
    return {**batch, **{f"heldout/{k}": v[::-1] for k, v in batch.items()}}


@pytest.mark.parametrize(
    "name", sorted(n for n in METHODS if get_method(n).needs_task_grads or n in ("rlw", "famo"))
)
def test_every_method_trains_three_steps_with_and_without_dgr(tiny_classifier, name):
    import optax

    from dgr_jax.objective import DGRConfig
    from dgr_jax.train import init_train_state, make_train_step

    net, tasks, batch = tiny_classifier
    method = get_method(name)
    if method.lookahead is not None:
        batch = with_heldout(batch)
    optimizer = optax.sgd(0.05, momentum=0.9)
    for weight in (0.0, 0.3):
        state = init_train_state(
            net, optimizer, jax.random.PRNGKey(0), batch["image"], 1, method, len(tasks)
        )
        step = jax.jit(
            make_train_step(net, tasks, DGRConfig(weight=weight, num_dummy=1), optimizer, method)
        )
        for _ in range(3):
            state, metrics = step(state, batch)
        assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
        assert int(state.step) == 3
        if "method/residual" in metrics:
            assert float(metrics["method/residual"]) < 1e-3, name


METHODS_SHARDED_SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 4)
import json, sys
import jax.numpy as jnp, numpy as np, optax
from dgr_jax import parallel
from dgr_jax.methods import get_method
from dgr_jax.models import ModelConfig, build_model
from dgr_jax.objective import DGRConfig
from dgr_jax.tasks import MULTIDIGITS
from dgr_jax.train import init_train_state, make_train_step
from experiments._bench import random_batch

net = build_model(ModelConfig(network="classifier", backbone="resnet18", base_width=4,
                              stage_sizes=(1, 1, 1, 1), classifier_hidden=8), MULTIDIGITS)
batch = random_batch(MULTIDIGITS, 8, 12, 24)
batch = {**batch, **{f"heldout/{k}": v[::-1] for k, v in batch.items()}}  # for autol
optimizer = optax.sgd(0.05, momentum=0.9)
results = {}
for name in sys.argv[1:]:
    method = get_method(name)
    step = make_train_step(net, MULTIDIGITS, DGRConfig(weight=0.3, num_dummy=1), optimizer, method)
    for devices in (1, 4):
        mesh = parallel.make_mesh(devices)
        state = init_train_state(net, optimizer, jax.random.PRNGKey(0),
                                 jnp.asarray(batch["image"][:1]), 1, method, 2)
        state = parallel.replicate(state, mesh)
        jitted = parallel.jit_train_step(step, mesh)
        for _ in range(2):
            state, metrics = jitted(state, parallel.global_batch(batch, mesh))
        method_state = state.method_state  # a solver's residual is rounding noise: left out
        if hasattr(method_state, "residual"):
            method_state = method_state._replace(residual=jnp.zeros(()))
        leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, method_state)))
        results[f"{name}/{devices}"] = np.concatenate(
            [np.ravel(x).astype(np.float64) for x in leaves]).tolist()
json.dump(results, sys.stdout)
"""


def test_gradient_methods_make_the_same_update_on_four_devices_as_on_one():
    """The methods act on the global batch's task gradients, so 4 data-parallel devices
    give one device's update (PRNG-driven ones too: the key is replicated)."""
    import subprocess
    import sys

    # One of each structure: a random order, a warm-started solver with head weights, a
    # look-ahead on a held-out batch, a representation-level method.
    names = ["pcgrad", "nash_mtl", "autol", "graddrop"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", METHODS_SHARDED_SCRIPT, *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for name in names:
        one, four = np.asarray(results[f"{name}/1"]), np.asarray(results[f"{name}/4"])
        # float32 sums in another order (as in test_loop's four-device test): 1e-4.
        assert np.linalg.norm(four - one) / np.linalg.norm(one) < 1e-4, name


def _vmap_repro_rows(vmapped: bool):
    """Minimal stand-alone case (plain jax) of the per-task VJP miscompilation: three
    "heads" upsampled by one bilinear-like map, the third L2-normalised by ``rsqrt``;
    the rows of the VJP for each task's cotangent, in float32."""
    rng = np.random.default_rng(0)
    rows_map = jnp.asarray(rng.uniform(size=(32, 4)), jnp.float32)
    cols_map = jnp.asarray(rng.uniform(size=(40, 5)), jnp.float32)
    zs = [jnp.asarray(rng.normal(size=(4, 4, 5, c)), jnp.float32) for c in (1, 1, 3)]
    targets = [jnp.asarray(rng.normal(size=(4, 32, 40, c)), jnp.float32) for c in (1, 1, 3)]

    def losses(zs):
        ys = [jnp.einsum("Hh,nhwc,Ww->nHWc", rows_map, z, cols_map) for z in zs]
        ys[2] = ys[2] * jax.lax.rsqrt(jnp.sum(ys[2] ** 2, -1, keepdims=True))
        return jnp.stack([jnp.mean(jnp.abs(y - t)) for y, t in zip(ys, targets)])

    def rows(zs):
        _, vjp = jax.vjp(losses, zs)
        eye = jnp.eye(3, dtype=jnp.float32)
        if vmapped:
            return jax.vmap(lambda c: vjp(c)[0])(eye)
        return jax.tree_util.tree_map(lambda *g: jnp.stack(g), *[vjp(c)[0] for c in eye])

    eager = jax.tree_util.tree_map(np.asarray, rows(zs))  # op by op: correct either way
    return eager, jax.tree_util.tree_map(np.asarray, jax.jit(rows)(zs))


def test_jitted_loop_of_vjps_is_the_workaround_and_is_exact():
    eager, jitted = _vmap_repro_rows(vmapped=False)
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(j, e, rtol=1e-4, atol=1e-7)


@pytest.mark.xfail(
    strict=True,
    reason="jax 0.10.2 / XLA:CPU: jit(vmap(vjp)) gives a wrong row for the rsqrt-normalised "
    "task (relative error ~9; eager and the jitted loop agree), so methods.stacked_vjps "
    "loops; when this passes, a vmapped VJP is correct again (on CPU the loop stays faster)",
)
def test_jitted_vmapped_vjp_equals_the_eager_rows():
    eager, jitted = _vmap_repro_rows(vmapped=True)
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(j, e, rtol=1e-4, atol=1e-7)
