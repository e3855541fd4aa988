"""dgr_penalty against independent computations.

References are brute force: the full Hessian of the dummy loss over the concatenated
(dummy parameters, encoder parameters) vector, built with ``jax.hessian`` in float64,
so that ``d||g||/d theta = H_{phi,theta}^T g / ||g||`` is formed without any of the
code under test.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dgr_jax import (
    PENALTY_ESTIMATORS,
    dgr_penalty,
    heads_penalty,
    init_dummy_sets,
    multitask_dummy_loss,
)


def rel_err(a, b):
    a, _ = ravel_pytree(a)
    b, _ = ravel_pytree(b)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def cosine(a, b):
    a, _ = ravel_pytree(a)
    b, _ = ravel_pytree(b)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# ---------------------------------------------------------------------------
# A smooth float64 model: tanh MLP encoder, softmax cross-entropy dummy head.

NUM_EXAMPLES, NUM_INPUTS, NUM_HIDDEN, NUM_CLASSES = 6, 4, 5, 3


def encoder(theta, x):
    return jnp.tanh(x @ theta["w"] + theta["b"][None, :])


def head_loss(phi, z, labels):
    logits = z @ phi["w"] + phi["b"][None, :]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def make_head(key):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (NUM_HIDDEN, NUM_CLASSES), jnp.float64),
        "b": 0.1 * jax.random.normal(k2, (NUM_CLASSES,), jnp.float64),
    }


@pytest.fixture(scope="module")
def smooth_problem():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    theta = {
        "w": jax.random.normal(keys[0], (NUM_INPUTS, NUM_HIDDEN), jnp.float64),
        "b": 0.1 * jax.random.normal(keys[1], (NUM_HIDDEN,), jnp.float64),
    }
    phi = make_head(keys[2])
    x = jax.random.normal(keys[3], (NUM_EXAMPLES, NUM_INPUTS), jnp.float64)
    labels = jax.random.randint(keys[4], (NUM_EXAMPLES,), 0, NUM_CLASSES)
    return theta, phi, x, labels


def penalty_of_theta(theta, phi, x, labels, **kwargs):
    return dgr_penalty(head_loss, phi, encoder(theta, x), labels, **kwargs)


def brute_force(theta, phi, x, labels):
    """||g||, d||g||/dtheta, d||g||/dphi and g from the full float64 Hessian."""
    phi_flat, unravel_phi = ravel_pytree(phi)
    theta_flat, unravel_theta = ravel_pytree(theta)
    n_phi = phi_flat.size

    def flat_loss(v):
        return head_loss(unravel_phi(v[:n_phi]), encoder(unravel_theta(v[n_phi:]), x), labels)

    v = jnp.concatenate([phi_flat, theta_flat])
    g = jax.grad(flat_loss)(v)[:n_phi]
    hessian = jax.hessian(flat_loss)(v)
    norm = jnp.sqrt(jnp.sum(g**2))
    u = g / norm
    return {
        "norm": norm,
        "g": g,
        "d_theta": unravel_theta(hessian[:n_phi, n_phi:].T @ u),
        "d_phi": unravel_phi(hessian[:n_phi, :n_phi] @ u),
        "d_theta_squared": unravel_theta(2 * hessian[:n_phi, n_phi:].T @ g),
    }


@pytest.mark.parametrize("method", PENALTY_ESTIMATORS)
def test_value_is_norm_of_grad(smooth_problem, method):
    theta, phi, x, labels = smooth_problem
    z = encoder(theta, x)
    g = jax.grad(head_loss)(phi, z, labels)
    expected = np.sqrt(sum(np.sum(np.asarray(leaf) ** 2) for leaf in jax.tree_util.tree_leaves(g)))
    value = dgr_penalty(head_loss, phi, z, labels, estimator=method)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    squared = dgr_penalty(head_loss, phi, z, labels, estimator=method, squared=True)
    np.testing.assert_allclose(squared, expected**2, rtol=1e-12)


def test_exact_and_double_backprop_match_brute_force_hessian(smooth_problem):
    theta, phi, x, labels = smooth_problem
    reference = brute_force(theta, phi, x, labels)
    grads = {
        m: jax.grad(penalty_of_theta, argnums=(0, 1))(theta, phi, x, labels, estimator=m)
        for m in ("exact", "double_backprop")
    }
    assert rel_err(grads["exact"][0], grads["double_backprop"][0]) < 1e-10
    for method, (d_theta, d_phi) in grads.items():
        assert rel_err(d_theta, reference["d_theta"]) < 1e-10, method
        assert rel_err(d_phi, reference["d_phi"]) < 1e-10, method


@pytest.mark.parametrize("method", ("exact", "double_backprop"))
def test_squared_gradient_is_twice_mixed_hessian_times_g(smooth_problem, method):
    theta, phi, x, labels = smooth_problem
    reference = brute_force(theta, phi, x, labels)
    d_theta = jax.grad(penalty_of_theta)(theta, phi, x, labels, estimator=method, squared=True)
    assert rel_err(d_theta, reference["d_theta_squared"]) < 1e-10


def test_finite_difference_converges_to_exact(smooth_problem, report):
    theta, phi, x, labels = smooth_problem
    exact = jax.grad(penalty_of_theta)(theta, phi, x, labels, estimator="exact")
    epsilons = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    errors = []
    for eps in epsilons:
        fd = jax.grad(penalty_of_theta)(
            theta, phi, x, labels, estimator="finite_difference", fd_eps=eps
        )
        errors.append(rel_err(fd, exact))
    report("finite difference vs exact, smooth float64 MLP (d penalty / d encoder params):")
    report("  fd_eps    relative error")
    for eps, err in zip(epsilons, errors):
        report(f"  {eps:7.0e}   {err:.3e}")
    # First-order convergence: every tenfold smaller step is at least 5x more accurate.
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < coarse / 5
    assert errors[-1] < 1e-4
    fd_squared = jax.grad(penalty_of_theta)(
        theta, phi, x, labels, estimator="finite_difference", fd_eps=1e-6, squared=True
    )
    assert rel_err(fd_squared, brute_force(theta, phi, x, labels)["d_theta_squared"]) < 1e-4


@pytest.mark.parametrize("method", PENALTY_ESTIMATORS)
@pytest.mark.parametrize("squared", (False, True))
def test_stacked_is_mean_of_single_calls(smooth_problem, method, squared):
    theta, _, x, labels = smooth_problem
    heads = [make_head(k) for k in jax.random.split(jax.random.PRNGKey(7), 3)]
    stacked_heads = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *heads)
    kwargs = dict(estimator=method, squared=squared)

    def mean_of_singles(theta):
        return sum(penalty_of_theta(theta, h, x, labels, **kwargs) for h in heads) / len(heads)

    def stacked(theta):
        return penalty_of_theta(theta, stacked_heads, x, labels, stacked=True, **kwargs)

    def unrolled(theta):
        return penalty_of_theta(
            theta, stacked_heads, x, labels, stacked=True, unroll_sets=True, **kwargs
        )

    np.testing.assert_allclose(stacked(theta), mean_of_singles(theta), rtol=1e-12)
    np.testing.assert_allclose(unrolled(theta), mean_of_singles(theta), rtol=1e-12)
    assert rel_err(jax.grad(stacked)(theta), jax.grad(mean_of_singles)(theta)) < 1e-10
    assert rel_err(jax.grad(unrolled)(theta), jax.grad(mean_of_singles)(theta)) < 1e-10


@pytest.mark.parametrize("method", PENALTY_ESTIMATORS)
@pytest.mark.parametrize("squared", (False, True))
def test_zero_gradient_gives_zero_penalty_and_finite_gradients(method, squared):
    def loss(phi, z):
        return jnp.sum(phi * z) ** 2  # grad_phi = 2 (phi . z) z, zero at z = 0

    phi = jnp.arange(1.0, 4.0)
    z = jnp.zeros(3)
    value = dgr_penalty(loss, phi, z, estimator=method, squared=squared)
    d_phi, d_z = jax.grad(
        lambda p, z: dgr_penalty(loss, p, z, estimator=method, squared=squared), argnums=(0, 1)
    )(phi, z)
    assert float(value) == 0.0
    assert np.all(np.isfinite(d_phi)) and np.all(np.isfinite(d_z))


def test_jit_compiles_once(smooth_problem):
    theta, phi, x, labels = smooth_problem

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_fn(theta, x):
        return jax.grad(penalty_of_theta)(theta, phi, x, labels)

    chex.clear_trace_counter()
    first = grad_fn(theta, x)
    second = grad_fn(theta, x + 1.0)  # new values, same shapes: no retrace
    assert rel_err(first, second) > 0


def test_traced_fd_eps_compiles_once_for_every_step(smooth_problem):
    theta, phi, x, labels = smooth_problem

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_fn(theta, eps):
        return jax.grad(penalty_of_theta)(
            theta, phi, x, labels, estimator="finite_difference", fd_eps=eps
        )

    chex.clear_trace_counter()
    for eps in (1e-2, 1e-4):
        static = jax.grad(penalty_of_theta)(
            theta, phi, x, labels, estimator="finite_difference", fd_eps=eps
        )
        assert rel_err(grad_fn(theta, jnp.float64(eps)), static) < 1e-9


@pytest.mark.parametrize("method", PENALTY_ESTIMATORS)
def test_vmap_over_examples_matches_loop(smooth_problem, method):
    theta, phi, x, labels = smooth_problem
    z = encoder(theta, x)

    def one(z_row, label):
        return dgr_penalty(head_loss, phi, z_row[None], label[None], estimator=method)

    batched = jax.vmap(one)(z, labels)
    looped = jnp.stack([one(z[i], labels[i]) for i in range(NUM_EXAMPLES)])
    np.testing.assert_allclose(batched, looped, rtol=1e-12)


def test_bad_arguments_raise_one_line_errors(smooth_problem):
    _, phi, x, labels = smooth_problem
    with pytest.raises(ValueError, match="unknown estimator 'newton'"):
        dgr_penalty(head_loss, phi, x, labels, estimator="newton")
    # `method` is the former name of `estimator`, still accepted.
    theta = smooth_problem[0]
    z = encoder(theta, x)
    np.testing.assert_array_equal(
        dgr_penalty(head_loss, phi, z, labels, method="double_backprop"),
        dgr_penalty(head_loss, phi, z, labels, estimator="double_backprop"),
    )
    with pytest.raises(ValueError, match="disagree"):
        dgr_penalty(
            head_loss, phi, x, labels, estimator="double_backprop", method="finite_difference"
        )
    with pytest.raises(ValueError, match="fd_eps must be positive"):
        dgr_penalty(head_loss, phi, x, labels, estimator="finite_difference", fd_eps=0.0)
    ragged = {"w": jnp.zeros((3, NUM_HIDDEN, NUM_CLASSES)), "b": jnp.zeros((2, NUM_CLASSES))}
    with pytest.raises(ValueError, match=r"leading \(dummy set\) axis: 2 at \['b'\], 3 at \['w'\]"):
        dgr_penalty(head_loss, ragged, x, labels, stacked=True)


# ---------------------------------------------------------------------------
# Multi-head helpers: encoder called once, dummy sets initialised by vmap.


class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, z):
        return {"a": nn.Dense(NUM_CLASSES, name="a")(z), "b": nn.Dense(1, name="b")(z)[:, 0]}


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def squared_error(prediction, target):
    return jnp.mean((prediction - target) ** 2)


TASK_LOSSES = {"a": cross_entropy, "b": squared_error}


def test_init_dummy_sets_are_independent_stacked_copies():
    z = jnp.zeros((2, NUM_HIDDEN))
    sets = init_dummy_sets(TwoHeads(), jax.random.PRNGKey(0), 3, z)
    single = TwoHeads().init(jax.random.PRNGKey(0), z)["params"]
    assert jax.tree_util.tree_structure(sets) == jax.tree_util.tree_structure(single)
    for stacked, one in zip(jax.tree_util.tree_leaves(sets), jax.tree_util.tree_leaves(single)):
        assert stacked.shape == (3,) + one.shape
    kernels = np.asarray(sets["a"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    with pytest.raises(ValueError, match="num_sets must be >= 1"):
        init_dummy_sets(TwoHeads(), jax.random.PRNGKey(0), 0, z)


def test_heads_penalty_calls_encoder_once_and_matches_brute_force(smooth_problem):
    theta, _, x, labels = smooth_problem
    targets = {"a": labels, "b": jnp.linspace(-1.0, 1.0, NUM_EXAMPLES)}
    module = TwoHeads()
    dummy_sets = init_dummy_sets(
        module, jax.random.PRNGKey(3), 2, jnp.zeros((1, NUM_HIDDEN), jnp.float64)
    )
    dummy_sets = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), dummy_sets)
    apply_heads = lambda params, z: module.apply({"params": params}, z)  # noqa: E731
    calls = []

    def counted_encoder(theta, x):
        calls.append(1)  # runs at trace time: counts encoder calls in the program
        return encoder(theta, x)

    def objective(theta):
        z = counted_encoder(theta, x)
        return heads_penalty(apply_heads, dummy_sets, z, targets, TASK_LOSSES)

    d_theta = jax.grad(objective)(theta)
    assert len(calls) == 1

    # Brute force per dummy set: full Hessian of the summed dummy loss in (phi, theta).
    theta_flat, unravel_theta = ravel_pytree(theta)
    expected = []
    for k in range(2):
        phi_k = jax.tree_util.tree_map(lambda a, k=k: a[k], dummy_sets)
        phi_flat, unravel_phi = ravel_pytree(phi_k)
        n = phi_flat.size

        def flat_loss(v, unravel_phi=unravel_phi, n=n):
            outputs = apply_heads(unravel_phi(v[:n]), encoder(unravel_theta(v[n:]), x))
            return cross_entropy(outputs["a"], targets["a"]) + squared_error(
                outputs["b"], targets["b"]
            )

        v = jnp.concatenate([phi_flat, theta_flat])
        g = jax.grad(flat_loss)(v)[:n]
        expected.append(jax.hessian(flat_loss)(v)[:n, n:].T @ (g / jnp.linalg.norm(g)))
    assert rel_err(d_theta, unravel_theta(sum(expected) / 2)) < 1e-10

    loss_fn = multitask_dummy_loss(apply_heads, {"a": cross_entropy, "c": squared_error})
    with pytest.raises(KeyError, match=r"no output for tasks \['c'\]"):
        loss_fn(jax.tree_util.tree_map(lambda a: a[0], dummy_sets), encoder(theta, x), targets)


# ---------------------------------------------------------------------------
# A float32 ReLU conv head with dilated convolutions and BatchNorm in training mode.


class DilatedConvHead(nn.Module):
    width: int = 8
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        for dilation in (2, 4):
            x = nn.Conv(self.width, (3, 3), kernel_dilation=dilation, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Conv(self.num_classes, (1, 1))(x)


def test_relu_conv_head_exact_matches_double_backprop_in_float32(report):
    head = DilatedConvHead()
    key_init, key_z, key_y = jax.random.split(jax.random.PRNGKey(1), 3)
    features = jax.random.normal(key_z, (2, 12, 16, 6), jnp.float32)
    labels = jax.random.randint(key_y, (2, 12, 16), 0, 4)
    dummy = head.init(key_init, features)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(dummy))

    def loss(params, z, y):
        # Training-mode BatchNorm: batch statistics; the new running stats are dropped.
        logits, _ = head.apply({"params": params}, z, mutable=["batch_stats"])
        return cross_entropy(logits.reshape(-1, 4), y.reshape(-1))

    grads = {
        method: jax.jit(
            jax.grad(lambda z, m=method: dgr_penalty(loss, dummy, z, labels, estimator=m))
        )(features)
        for method in PENALTY_ESTIMATORS
    }
    assert all(g.dtype == jnp.float32 for g in grads.values())
    exact_vs_reference = rel_err(grads["exact"], grads["double_backprop"])
    assert exact_vs_reference < 1e-5
    fd_cos = cosine(grads["finite_difference"], grads["exact"])
    fd_err = rel_err(grads["finite_difference"], grads["exact"])
    report("ReLU dilated-conv head, BatchNorm in training mode, float32 (d penalty / d features):")
    report(f"  exact vs double_backprop: relative error {exact_vs_reference:.2e}")
    report(
        f"  finite_difference (eps=1e-3) vs exact: cosine {fd_cos:.4f}, relative error {fd_err:.3e}"
    )
    assert np.isfinite(fd_cos) and np.isfinite(fd_err)
