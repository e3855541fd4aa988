"""The train step in every DGR mode, and the paper's estimator against the exact gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgr_jax import heads_penalty
from dgr_jax.models import ModelConfig, build_model, heads_apply_fn
from dgr_jax.objective import DGRConfig, paper_dgr_encoder_grads
from dgr_jax.tasks import NYUV2, task_losses
from dgr_jax.train import init_train_state, make_train_step
from experiments._bench import random_batch

TINY = ModelConfig(
    network="split", backbone="resnet18", base_width=4, head_width=8, stage_sizes=(1, 1, 1, 1)
)


@pytest.fixture(scope="module")
def setup():
    net = build_model(TINY, NYUV2)
    batch = {k: jnp.asarray(v) for k, v in random_batch(NYUV2, 4, 32, 40).items()}
    return net, batch


@pytest.mark.parametrize(
    "method", ["none", "exact", "double_backprop", "finite_difference", "paper"]
)
def test_step_trains_heads_and_encoder_and_leaves_dummy_sets_alone(setup, method):
    net, batch = setup
    dgr = DGRConfig(
        weight=0.0 if method == "none" else 0.5, estimator="exact" if method == "none" else method
    )
    optimizer = optax.sgd(0.01, momentum=0.9)
    state = init_train_state(net, optimizer, jax.random.PRNGKey(0), batch["image"], dgr.num_dummy)
    before = jax.tree_util.tree_map(np.asarray, state)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
        return make_train_step(net, NYUV2, dgr, optimizer)(state, batch)

    chex.clear_trace_counter()
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    assert int(state.step) == 2
    assert all(np.isfinite(float(v)) for v in metrics.values())
    if method in ("exact", "double_backprop", "finite_difference", "paper"):
        assert float(metrics["dgr/penalty"]) > 0
    if method == "paper":
        assert float(metrics["grad_norm/dgr_encoder"]) > 0
    for name in ("encoder", "heads"):
        changed = jax.tree_util.tree_map(
            lambda a, b: not np.allclose(a, b), before.params[name], state.params[name]
        )
        assert any(jax.tree_util.tree_leaves(changed)), name
    chex.assert_trees_all_equal(
        before.dummy_sets, jax.tree_util.tree_map(np.asarray, state.dummy_sets)
    )


def as64(tree):
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a
        ),
        tree,
    )


@pytest.mark.parametrize("squared, num_dummy", [(True, 2), (False, 1)])
def test_paper_estimator_approximates_gradient_of_norm_or_squared_norm(setup, squared, num_dummy):
    """float64, tiny eps: the original algorithm estimates d/d theta of lambda/K sum ||g_d||^2
    (``squared``) or of lambda/K sum ||g_d||."""
    net, batch = setup
    batch = as64(batch)
    state = jax.jit(  # jitted: every computation here runs once, eager dispatch is slower
        lambda key: init_train_state(net, optax.sgd(0.1), key, batch["image"], num_dummy)
    )(jax.random.PRNGKey(1))
    params, batch_stats, dummy = as64(state.params), as64(state.batch_stats), as64(state.dummy_sets)
    dgr = DGRConfig(
        weight=0.7, num_dummy=num_dummy, estimator="paper", fd_eps=1e-6, squared=squared
    )
    estimate, reported = jax.jit(
        lambda params, batch_stats, dummy, batch: paper_dgr_encoder_grads(
            net, NYUV2, dgr, params, batch_stats, dummy, batch, with_penalty=True
        )
    )(params, batch_stats, dummy, batch)

    def penalty(encoder_params):
        features, _ = net.encoder.apply(
            {"params": encoder_params, "batch_stats": batch_stats["encoder"]},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        targets = {t.name: batch[t.name] for t in NYUV2}
        return 0.7 * heads_penalty(
            heads_apply_fn(net.heads, (32, 40)),
            dummy,
            features,
            targets,
            task_losses(NYUV2),
            squared=squared,
        )

    value, exact = jax.jit(jax.value_and_grad(penalty))(params["encoder"])
    # The penalty it reports for the curves is the one the other estimators report.
    assert abs(float(reported) - float(value) / 0.7) < 1e-7 * float(value)
    a = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(estimate)])
    b = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(exact)])
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-3


def _hand_written_losses(outputs, batch):
    """auto-lambda's compute_loss, written out: CE with -1 ignored; L1 over depth != 0;
    normals: sum over channels of |p - t|, over pixels whose target channels sum != 0."""
    logits, labels = outputs["seg"], batch["seg"]
    valid = labels != -1
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    seg = -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)
    depth_valid = batch["depth"] != 0
    depth = jnp.sum(
        jnp.where(depth_valid, jnp.abs(outputs["depth"] - batch["depth"]), 0.0)
    ) / jnp.sum(depth_valid)
    normal_valid = jnp.sum(batch["normal"], axis=-1, keepdims=True) != 0
    normal_error = jnp.where(normal_valid, jnp.abs(outputs["normal"] - batch["normal"]), 0.0)
    normal = jnp.sum(normal_error) / jnp.sum(normal_valid)
    return seg + depth + normal


def test_original_code_update_is_paper_squared_one_dummy_set_and_equals_its_formula(setup):
    """``--dgr_method paper --squared_norm --num_dummy 1`` (fd_eps 1e-3): the step's encoder
    update minus the task gradient equals lambda * 2 (L+ - L)(G+ - G) / eps^2, written here
    from the DGR repository's compute_hessian, in float64; and the step's running
    statistics are those of two train-mode forwards, as the original's."""
    from experiments.cli import build_config, make_parser
    from experiments.datasets import DATASETS

    net, batch = setup
    batch = as64(batch)
    argv = [
        "--synthetic",
        "--dgr_weight",
        "0.3",
        "--dgr_method",
        "paper",
        "--squared_norm",
        "--num_dummy",
        "1",
    ]
    spec = DATASETS["nyuv2"]
    dgr = build_config(spec, make_parser(spec).parse_args(argv)).dgr
    assert (dgr.estimator, dgr.squared, dgr.num_dummy, dgr.fd_eps) == ("paper", True, 1, 1e-3)
    optimizer = optax.sgd(1.0)  # new params = old - grads
    state = as64(init_train_state(net, optimizer, jax.random.PRNGKey(3), batch["image"], 1))
    new_state, _ = jax.jit(make_train_step(net, NYUV2, dgr, optimizer))(state, batch)
    applied = jax.tree_util.tree_map(
        lambda a, b: np.asarray(a) - np.asarray(b),
        state.params["encoder"],
        new_state.params["encoder"],
    )

    size = batch["image"].shape[1:3]
    variables = lambda params, stats: {"params": params, "batch_stats": stats}  # noqa: E731

    def features_of(encoder):
        return net.encoder.apply(
            variables(encoder, state.batch_stats["encoder"]),
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )[0]

    def dummy_loss(encoder, phi):
        outputs, _ = net.heads.apply(
            {"params": phi}, features_of(encoder), size, train=True, mutable=["batch_stats"]
        )
        return _hand_written_losses(outputs, batch)

    def task_loss(encoder):
        outputs, _ = net.heads.apply(
            variables(state.params["heads"], state.batch_stats["heads"]),
            features_of(encoder),
            size,
            train=True,
            mutable=["batch_stats"],
        )
        return _hand_written_losses(outputs, batch)

    theta, phi, eps = (
        state.params["encoder"],
        jax.tree_util.tree_map(lambda a: a[0], state.dummy_sets),
        1e-3,
    )
    loss, (G, g) = jax.value_and_grad(dummy_loss, argnums=(0, 1))(theta, phi)
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(g)))
    phi_plus = jax.tree_util.tree_map(lambda p, d: p + eps / norm * d, phi, g)
    loss_plus, G_plus = jax.value_and_grad(dummy_loss)(theta, phi_plus)
    prox = jax.tree_util.tree_map(
        lambda gp, g0: 2 * (loss_plus - loss) * (gp - g0) / eps**2, G_plus, G
    )
    want = jax.tree_util.tree_map(lambda t, p: t + 0.3 * p, jax.grad(task_loss)(theta), prox)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    got, want = flat(applied), flat(want)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-9
    assert np.linalg.norm(flat(prox)) > 0.1 * np.linalg.norm(want)  # the DGR part is not negligible

    # Running statistics: two updates with the same batch statistics, m^2 old + (1 - m^2) b.
    exact_state, _ = jax.jit(
        make_train_step(net, NYUV2, DGRConfig(weight=0.3, num_dummy=1), optimizer)
    )(state, batch)
    for old, once, twice in zip(
        *(jax.tree_util.tree_leaves(s.batch_stats) for s in (state, exact_state, new_state))
    ):
        batch_value = (np.asarray(once) - 0.9 * np.asarray(old)) / 0.1
        np.testing.assert_allclose(
            twice, 0.81 * np.asarray(old) + 0.19 * batch_value, rtol=1e-9, atol=1e-12
        )


def test_repeated_running_statistics_update_equals_updating_in_a_loop():
    from dgr_jax.objective import repeat_running_stats_update

    rng = np.random.default_rng(0)
    old, batch_value = rng.normal(size=5), rng.normal(size=5)
    for repeats in (0, 1, 3):
        expected = old.copy()
        for _ in range(repeats + 1):
            expected = 0.9 * expected + 0.1 * batch_value
        got = repeat_running_stats_update(
            {"v": old}, {"v": 0.9 * old + 0.1 * batch_value}, repeats
        )["v"]
        np.testing.assert_allclose(got, expected, rtol=1e-13)


def test_gradient_method_path_combines_task_gradients_then_adds_dgr(setup):
    """A method with ``needs_task_grads`` gets per-task encoder gradients
    (``methods.per_task_gradients``) and DGR's gradient is added after its combination:
    checked against T separate ``jax.grad`` calls, normalised and summed here, plus
    lambda * grad P."""
    from dgr_jax.methods import MTLMethod, get_method
    from dgr_jax.objective import task_losses_and_penalty

    net, batch = setup
    equal = get_method("equal")

    def normalised_sum(task_grads, task_losses, weights, state):
        norms = jnp.sqrt(
            sum(
                jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
                for g in jax.tree_util.tree_leaves(task_grads)
            )
        )
        return jax.tree_util.tree_map(
            lambda g: jnp.tensordot(1.0 / norms, g, axes=1), task_grads
        ), state

    method = MTLMethod(
        init=equal.init, loss=equal.loss, combine=normalised_sum, needs_task_grads=True
    )
    dgr = DGRConfig(weight=0.3, num_dummy=1)
    optimizer = optax.sgd(1.0)  # new params = old - grads
    state = init_train_state(net, optimizer, jax.random.PRNGKey(2), batch["image"], 1, method)
    new_state, _ = jax.jit(make_train_step(net, NYUV2, dgr, optimizer, method))(state, batch)
    applied = jax.tree_util.tree_map(
        lambda a, b: np.asarray(a) - np.asarray(b), state.params, new_state.params
    )

    _, dropout_rng = jax.random.split(state.rng)
    model = {"encoder": state.params["encoder"], "heads": state.params["heads"]}

    def part(model, index):  # task loss `index`, or the weighted penalty for index == T
        per_task, penalty, _ = task_losses_and_penalty(
            net, NYUV2, dgr, model, state.batch_stats, state.dummy_sets, batch, dropout_rng
        )
        return per_task[index] if index < len(NYUV2) else dgr.weight * penalty

    grad = jax.jit(jax.grad(part), static_argnums=1)
    grads = [grad(model, i) for i in range(len(NYUV2) + 1)]
    flat = [
        np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g["encoder"])])
        for g in grads
    ]
    want_encoder = sum(f / np.linalg.norm(f) for f in flat[:-1]) + flat[-1]
    want_heads = sum(
        np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g["heads"])]) for g in grads
    )
    got_encoder = np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(applied["encoder"])]
    )
    got_heads = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(applied["heads"])])
    # float32 model: compare as vectors (per-element noise ~1e-5 of the largest entries).
    for got, want in ((got_encoder, want_encoder), (got_heads, want_heads)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3
