"""MTL methods: each against a hand computation, and the interface from a train step's view."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgr_jax.weighting import METHODS, MTLMethod, dwa, equal, get_method, uncertainty, weighted_sum

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
    np.testing.assert_array_equal(state["epoch_losses"][1], [1.0, 2.0, 0.5])
    np.testing.assert_array_equal(method.loss(params, losses, state)[1], np.ones(3))
    state = _feed_epoch(method, state, [[0.8, 1.0, 0.6]])
    assert int(state["epoch"]) == 2

    # Epoch 2: r = L(1) / L(0) = [0.8, 0.5, 1.2]; w = 3 exp(r/2) / sum exp(r/2).
    e = [math.exp(0.8 / 2), math.exp(0.5 / 2), math.exp(1.2 / 2)]
    expected = [3 * v / sum(e) for v in e]
    total, weights = method.loss(params, jnp.array([2.0, 1.0, 0.5], F64), state)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    np.testing.assert_allclose(total, 2.0 * expected[0] + expected[1] + 0.5 * expected[2], rtol=1e-12)
    # Weights are constants for the gradient.
    grad = jax.grad(lambda l: method.loss(params, l, state)[0])(losses)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)

    # end_epoch rolls the history and resets the running mean.
    state = method.update(state, jnp.array([0.4, 1.0, 0.3], F64))
    state = method.update(state, jnp.array([0.4, 0.8, 0.9], F64))
    assert int(state["num_steps"]) == 2
    state = method.end_epoch(state)
    np.testing.assert_allclose(state["epoch_losses"], [[0.8, 1.0, 0.6], [0.4, 0.9, 0.6]], rtol=1e-12)
    np.testing.assert_array_equal(state["loss_sum"], np.zeros(3))
    assert int(state["num_steps"]) == 0 and int(state["epoch"]) == 3
    e = [math.exp(0.5 / 2), math.exp(0.9 / 2), math.exp(1.0 / 2)]
    np.testing.assert_allclose(method.loss(params, losses, state)[1], [3 * v / sum(e) for v in e], rtol=1e-12)


def test_uncertainty_defaults_are_the_original_codes_form_from_minus_0_7():
    """auto-lambda / the DGR repository: total = sum_t l_t / (2 exp(w_t)) + w_t / 2, with
    logsigma = torch.tensor([-0.7] * T) weight-decayed in the same SGD group."""
    method = uncertainty()
    params, state = method.init(3, F64)
    np.testing.assert_array_equal(params["log_var"], np.full(3, -0.7))
    assert method.decay_params
    losses = jnp.array([0.3, 1.7, 4.0], F64)
    total, weights = method.loss(params, losses, state)
    # By hand at w = -0.7: 1 / (2 e^-0.7) = e^0.7 / 2 = 2.0137527... / 2
    np.testing.assert_allclose(weights, np.full(3, 1.0068763537352383), rtol=1e-14)
    np.testing.assert_allclose(total, 1.0068763537352383 * 6.0 + 3 * (-0.35), rtol=1e-14)
    w = np.array([-0.5, 0.2, 1.1])
    total, weights = method.loss({"log_var": jnp.asarray(w)}, losses, state)
    l = np.asarray(losses)
    np.testing.assert_allclose(total, np.sum(l / (2 * np.exp(w)) + w / 2), rtol=1e-14)
    np.testing.assert_allclose(weights, 1 / (2 * np.exp(w)), rtol=1e-14)


def test_uncertainty_kendall_form_total_gradient_and_optimum_match_closed_form():
    method = get_method("uncertainty", scale=1.0, initial_log_var=0.0, weight_decay=False)
    params, state = method.init(3, F64)
    np.testing.assert_array_equal(params["log_var"], np.zeros(3))
    assert not method.decay_params
    losses = jnp.array([0.3, 1.7, 4.0], F64)
    log_var = jnp.array([-0.5, 0.2, 1.1], F64)
    total, weights = method.loss({"log_var": log_var}, losses, state)
    s, l = np.asarray(log_var), np.asarray(losses)
    np.testing.assert_allclose(total, np.sum(np.exp(-s) * l + s), rtol=1e-14)
    np.testing.assert_allclose(weights, np.exp(-s), rtol=1e-14)

    def total_of(p, l):
        return method.loss(p, l, state)[0]

    grad_s, grad_l = jax.grad(total_of, argnums=(0, 1))({"log_var": log_var}, losses)
    np.testing.assert_allclose(grad_s["log_var"], -np.exp(-s) * l + 1.0, rtol=1e-14)
    np.testing.assert_allclose(grad_l, np.exp(-s), rtol=1e-14)

    # s* = log l: the gradient vanishes there and the total is larger on both sides.
    optimum = {"log_var": jnp.log(losses)}
    np.testing.assert_allclose(jax.grad(total_of)(optimum, losses)["log_var"], np.zeros(3), atol=1e-14)
    for shift in (-0.1, 0.1):
        assert float(total_of({"log_var": jnp.log(losses) + shift}, losses)) > float(total_of(optimum, losses))


def test_dwa_epoch_average_weighs_a_short_last_batch_by_its_size():
    """The original's running mean: r = n / (n + b/B), m = r m + (1 - r) loss, per step."""
    method = dwa()
    _, state = method.init(2, F64)
    steps = [([1.0, 4.0], 4), ([3.0, 2.0], 4), ([0.5, 9.0], 2)]  # batches of 4, 4 and a short one of 2
    running, counter = np.zeros(2), 0
    for losses, size in steps:
        state = method.update(state, jnp.asarray(losses, F64), size)
        r = counter / (counter + size / 4)
        running = r * running + (1 - r) * np.asarray(losses)
        counter += 1
    state = method.end_epoch(state)
    np.testing.assert_allclose(state["epoch_losses"][1], running, rtol=1e-14)
    np.testing.assert_allclose(running, [(4 + 12 + 1) / 10, (16 + 8 + 18) / 10], rtol=1e-14)


def test_weighted_sum_combine_matches_numpy():
    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 2))}
    weights = np.array([0.5, 1.5, -2.0])
    combined, state = weighted_sum(jax.tree_util.tree_map(jnp.asarray, grads), jnp.ones(3, F64),
                                   jnp.asarray(weights), {"kept": jnp.zeros(())})
    for name, g in grads.items():
        np.testing.assert_allclose(combined[name], np.einsum("t,t...->...", weights, g), rtol=1e-12)
    assert set(state) == {"kept"}
    with pytest.raises(ValueError, match="leading axis"):
        weighted_sum({"w": jnp.zeros((2, 4))}, jnp.ones(3), jnp.ones(3), {})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_pure_and_jits_once(name):
    method = get_method(name)
    params, state = method.init(3)  # float32 by default, as in training
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves((params, state)))
    losses = jnp.array([1.0, 2.0, 3.0], jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, losses):
        total, weights = method.loss(params, losses, state)
        combined, state = method.combine({"g": jnp.ones((3, 2), jnp.float32)}, losses, weights, state)
        return total, weights, combined, method.update(state, losses)

    chex.clear_trace_counter()
    for _ in range(3):
        total, weights, combined, state = step(params, state, losses)
        state = jax.jit(method.end_epoch)(state)
    assert total.dtype == jnp.float32 and weights.shape == (3,)
    np.testing.assert_allclose(combined["g"], np.full(2, float(jnp.sum(weights))), rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(method.loss)(params, losses, state), method.loss(params, losses, state))


def test_registry_and_argument_checks():
    assert set(METHODS) == {"equal", "dwa", "uncertainty"}
    with pytest.raises(ValueError, match=r"^unknown MTL method 'pcgrad'; valid: equal, dwa, uncertainty$"):
        get_method("pcgrad")
    with pytest.raises(ValueError, match="temperature"):
        get_method("dwa", temperature=0.0)
    with pytest.raises(ValueError, match="num_tasks"):
        uncertainty().init(0)
    params, state = dwa().init(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        dwa().loss(params, jnp.ones(2), state)


# --- The interface from a train step's point of view -------------------------------------

T = 3
DGR_WEIGHT = 0.7


def _toy_problem():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 4)))
    targets = jnp.asarray(rng.normal(size=(6, T)))
    model = {"encoder": jnp.asarray(rng.normal(size=(4, 5))), "heads": jnp.asarray(rng.normal(size=(5, T)))}

    def objective(model):
        """Per-task losses and the DGR term; the encoder runs once. P = ||W||^2 / 2, grad W."""
        features = jnp.tanh(x @ model["encoder"])
        losses = jnp.mean(jnp.square(features @ model["heads"] - targets), axis=0)
        return losses, DGR_WEIGHT * 0.5 * jnp.sum(jnp.square(model["encoder"]))

    return model, objective


def _train_step_grads(method, objective, params, mstate, force_task_grads=False):
    """The train step of the module docstring, verbatim up to names."""
    tree_map = jax.tree_util.tree_map

    def model_of(p):
        return {"encoder": p["encoder"], "heads": p["heads"]}

    if not (method.needs_task_grads or force_task_grads):
        def f(params):
            losses, dgr_term = objective(model_of(params))
            total, w = method.loss(params["method"], losses, mstate)
            return total + dgr_term, (losses, w)

        grads, (losses, w) = jax.grad(f, has_aux=True)(params)
    else:
        (losses, _), vjp = jax.vjp(objective, model_of(params))
        cotangents = jnp.eye(T + 1, dtype=losses.dtype)
        rows = jax.vmap(lambda c: vjp((c[:T], c[T]))[0])(cotangents)
        task_grads, dgr_grads = tree_map(lambda g: g[:T], rows), tree_map(lambda g: g[T], rows)
        (_, w), method_grads = jax.value_and_grad(method.loss, has_aux=True)(params["method"], losses, mstate)
        encoder, mstate = method.combine(task_grads["encoder"], losses, w, mstate)
        heads, _ = weighted_sum(task_grads["heads"], losses, w, mstate)
        grads = tree_map(jnp.add, {"encoder": encoder, "heads": heads}, dgr_grads)
        grads["method"] = method_grads
    return grads, method.update(mstate, jax.lax.stop_gradient(losses))


def _dwa_after_two_epochs():
    method = dwa()
    _, state = method.init(T, F64)
    state = _feed_epoch(method, state, [[1.0, 2.0, 0.5]])
    return method, _feed_epoch(method, state, [[0.8, 1.0, 0.6]])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_cheap_path_equals_task_gradient_path_for_loss_weighting(name):
    """By linearity, one gradient of the weighted total = weighted_sum of task grads + DGR."""
    model, objective = _toy_problem()
    if name == "dwa":
        method, mstate = _dwa_after_two_epochs()
        method_params = {}
    else:
        method = get_method(name)
        method_params, mstate = method.init(T, F64)
        if name == "uncertainty":
            method_params = {"log_var": jnp.array([0.3, -0.4, 0.9], F64)}
    params = {**model, "method": method_params}
    cheap, state_cheap = _train_step_grads(method, objective, params, mstate)
    full, state_full = _train_step_grads(method, objective, params, mstate, force_task_grads=True)
    chex.assert_trees_all_close(cheap, full, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(state_cheap, state_full)
    if name != "equal":  # the weights are not all 1, so this test can tell weighted from plain sums
        _, w = method.loss(method_params, objective(model)[0], mstate)
        assert float(jnp.max(jnp.abs(w - 1.0))) > 0.05


def _normalised_sum() -> MTLMethod:
    """A toy gradient method: sum_t g_t / ||g_t||, with a step counter as state."""

    def init(num_tasks, dtype=jnp.float32):
        return {}, {"combines": jnp.zeros((), jnp.int32)}

    def loss(params, task_losses, state):
        return jnp.sum(task_losses), jnp.ones_like(task_losses)

    def combine(task_grads, task_losses, weights, state):
        leaves = jax.tree_util.tree_leaves(task_grads)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves))
        combined = jax.tree_util.tree_map(lambda g: jnp.tensordot(1.0 / norms, g, axes=1), task_grads)
        return combined, {"combines": state["combines"] + 1}

    return MTLMethod(init=init, loss=loss, combine=combine, needs_task_grads=True)


def test_gradient_method_fits_the_interface_and_dgr_is_added_after_combination():
    model, objective = _toy_problem()
    method = _normalised_sum()
    method_params, mstate = method.init(T)
    params = {**model, "method": method_params}
    grads, mstate = jax.jit(lambda p, s: _train_step_grads(method, objective, p, s))(params, mstate)
    assert int(mstate["combines"]) == 1

    # Reference: T separate backward passes, normalised in numpy, then + lambda * grad P = lambda * W.
    per_task = [jax.grad(lambda m, t=t: objective(m)[0][t])(model) for t in range(T)]
    encoder = sum(np.asarray(g["encoder"]) / np.linalg.norm(np.asarray(g["encoder"])) for g in per_task)
    np.testing.assert_allclose(grads["encoder"], encoder + DGR_WEIGHT * np.asarray(model["encoder"]), rtol=1e-12)
    np.testing.assert_allclose(grads["heads"], sum(np.asarray(g["heads"]) for g in per_task), rtol=1e-12)
    assert grads["method"] == {}
