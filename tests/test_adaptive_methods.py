"""Auto-lambda, FAMO, GradNorm and DB-MTL against float64 references written from their
papers: a finite difference of the look-ahead loss, numpy (Adam as its paper writes it)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgr_jax.methods import LookAhead, get_method
from dgr_jax.methods.lookahead import exact_hypergradient, finite_difference_hypergradient

LR, MOMENTUM, DECAY = 0.1, 0.9, 1e-4


def toy_problem(seed=0, num_tasks=3):
    """A two-layer regression network, T tasks, a training and a held-out batch."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": jnp.asarray(rng.normal(size=(4, 6)) * 0.5),
        "heads": jnp.asarray(rng.normal(size=(num_tasks, 6)) * 0.5),
    }

    def losses(p, x, y):
        features = jnp.tanh(x @ p["encoder"])
        return jnp.mean((features @ p["heads"].T - y) ** 2, axis=0)

    train = (jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, num_tasks))))
    heldout = (jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, num_tasks))))
    buffer = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    return params, losses, train, heldout, buffer


def sgd_context(params, losses, train, heldout, buffer):
    """The step's LookAhead for SGD (momentum, weight decay) with a momentum buffer."""
    optimizer = optax.chain(optax.add_decayed_weights(DECAY), optax.sgd(LR, momentum=MOMENTUM))
    opt_state = optimizer.init(params)
    # optax's trace state holds the buffer (chain: [decay (empty), sgd: (trace, ...)])
    opt_state = (opt_state[0], (optax.TraceState(trace=buffer),) + tuple(opt_state[1][1:]))

    def virtual_step(grads):
        updates, _ = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates)

    task_grads = jax.jacrev(lambda p: losses(p, *train))(params)
    return LookAhead(
        params=params,
        task_grads=task_grads,
        virtual_step=virtual_step,
        task_losses=lambda p: losses(p, *train),
        heldout_losses=lambda p: losses(p, *heldout),
    )


def lookahead_by_hand(params, losses, train, heldout, buffer, weights):
    """``L_val(theta')`` with the original's virtual step, written out:
    ``theta' = theta - lr (momentum * buf + sum_t w_t g_t + decay * theta)``."""
    grads = jax.grad(lambda p: jnp.dot(weights, losses(p, *train)))(params)
    after = jax.tree_util.tree_map(
        lambda p, g, b: p - LR * (MOMENTUM * b + g + DECAY * p), params, grads, buffer
    )
    return jnp.sum(losses(after, *heldout))


def test_autol_exact_hypergradient_equals_a_finite_difference_of_the_lookahead_loss(report):
    problem = toy_problem()
    context = sgd_context(*problem)
    weights = jnp.asarray([0.1, 0.3, 0.7])
    exact = np.asarray(exact_hypergradient(context, weights))
    h = 1e-5
    fd = np.array(
        [
            (
                lookahead_by_hand(*problem, weights + h * e)
                - lookahead_by_hand(*problem, weights - h * e)
            )
            / (2 * h)
            for e in np.eye(3)
        ]
    )
    error = np.linalg.norm(exact - fd) / np.linalg.norm(fd)
    assert error < 1e-6, error
    # The original's estimate (eps = 0.01 / ||v||) is an approximation of the same numbers.
    original = np.asarray(finite_difference_hypergradient(context, weights))
    original_error = np.linalg.norm(original - exact) / np.linalg.norm(exact)
    assert original_error < 1e-2
    report(
        f"autol: exact hypergradient vs a float64 finite difference of the look-ahead loss: "
        f"{error:.1e} relative; the original's estimate vs exact: {original_error:.1e}"
    )


def test_autol_weights_move_toward_the_task_that_helps_the_heldout_loss():
    """Task 0's training data agree with the held-out data; task 1's targets are wrong."""
    theta = {"encoder": jnp.zeros(()), "heads": jnp.zeros(())}

    def train_losses(p):
        return jnp.stack([(p["encoder"] - 1.0) ** 2, (p["encoder"] + 1.0) ** 2])

    def heldout_losses(p):
        return jnp.stack([(p["encoder"] - 1.0) ** 2, (p["encoder"] - 1.0) ** 2])

    method = get_method("autol", lr=1e-2)
    _, state = method.init(2, jnp.float64)
    for _ in range(20):
        context = LookAhead(
            params=theta,
            task_grads=jax.jacrev(train_losses)(theta),
            virtual_step=lambda g: jax.tree_util.tree_map(lambda p, x: p - 0.1 * x, theta, g),
            task_losses=train_losses,
            heldout_losses=heldout_losses,
        )
        state = method.lookahead(state, context)
    weights = np.asarray(state.weights)
    assert weights[0] > 0.1 + 0.15 and weights[1] < 0.1 - 0.15, weights


def numpy_adam(lr):
    """Adam as its paper writes it (b1 0.9, b2 0.999, eps 1e-8), a closure over (m, v, t)."""
    m = v = 0.0
    t = 0

    def step(x, g):
        nonlocal m, v, t
        t += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        return x - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)

    return step


def test_famo_weights_and_logit_update_match_the_paper():
    """Against numpy: the paper's loss, and one Adam step on the logits per update with
    torch's ``Adam(weight_decay=gamma)`` semantics (``gamma * xi`` added to the gradient)."""
    gamma, w_lr = 0.01, 0.025
    method = get_method("famo", gamma=gamma, w_lr=w_lr)
    _, state = method.init(3, jnp.float64)
    logits, adam = np.zeros(3), numpy_adam(w_lr)
    rng = np.random.default_rng(0)
    for _ in range(4):
        before = rng.uniform(0.5, 3.0, 3)
        after = before * rng.uniform(0.6, 1.1, 3)
        total, weights = method.loss((), jnp.asarray(before), state)
        # The paper: total = sum z log l / c, c = sum z / l held constant (the code's
        # 1e-8 added to l accounts for the tolerance).
        z = np.exp(logits) / np.sum(np.exp(logits))
        c = np.sum(z / before)
        np.testing.assert_allclose(float(total), np.sum(z * np.log(before)) / c, rtol=1e-6)
        np.testing.assert_allclose(weights, z / (c * before), rtol=1e-6)
        state = method.after_update(state, jnp.asarray(before), jnp.asarray(after))
        # delta = log l_before - log l_after, pulled back through the softmax by hand.
        delta = np.log(before) - np.log(after)
        grad = z * (delta - z @ delta)
        logits = adam(logits, grad + gamma * logits)
        np.testing.assert_allclose(state.logits, logits, rtol=1e-7, atol=1e-9)


def random_task_grads(rng, num_tasks):
    return rng.normal(size=(num_tasks, 7)) * rng.uniform(0.2, 5.0, (num_tasks, 1))


def tree(g):
    return {"a": jnp.asarray(g[:, :3]), "b": jnp.asarray(g[:, 3:].reshape(-1, 2, 2))}


def flat(t):
    return np.concatenate([np.asarray(t["a"]).reshape(-1), np.asarray(t["b"]).reshape(-1)])


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_gradnorm_matches_the_papers_rule(num_tasks):
    alpha, lr = 1.5, 0.025
    method = get_method("gradnorm", alpha=alpha, lr=lr)
    _, state = method.init(num_tasks, jnp.float64)
    rng = np.random.default_rng(num_tasks)
    w, adam, initial = np.ones(num_tasks), numpy_adam(lr), None
    for _ in range(4):
        g = random_task_grads(rng, num_tasks)
        losses = rng.uniform(0.5, 2.0, num_tasks)
        total, weights = method.loss((), jnp.asarray(losses), state)
        np.testing.assert_allclose(weights, w, rtol=1e-12)
        combined, state = method.combine(tree(g), jnp.asarray(losses), weights, state)
        np.testing.assert_allclose(flat(combined), w @ g, rtol=1e-12)
        # The paper: G_i = ||w_i g_i||, target mean(G) r_i^alpha (constant), L_grad = sum |G - target|.
        initial = losses if initial is None else initial
        ratio = losses / initial
        gnorm = w * np.linalg.norm(g, axis=1)
        target = gnorm.mean() * (ratio / ratio.mean()) ** alpha
        grad = np.sign(gnorm - target) * np.linalg.norm(g, axis=1)
        w = np.maximum(adam(w, grad), 1e-3)
        w = num_tasks * w / w.sum()
        np.testing.assert_allclose(state.weights, w, rtol=1e-10)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_db_mtl_matches_the_papers_rule(num_tasks):
    beta, sigma = 0.9, 0.5
    method = get_method("db_mtl", beta=beta, beta_sigma=sigma)
    shared = {"a": jnp.zeros(3, jnp.float64), "b": jnp.zeros((2, 2), jnp.float64)}
    _, state = method.init(num_tasks, jnp.float64, shared=shared)
    rng = np.random.default_rng(num_tasks)
    buffer = np.zeros((num_tasks, 7))
    for k in range(1, 5):
        g = random_task_grads(rng, num_tasks)  # d l_t / d theta
        losses = rng.uniform(0.5, 2.0, num_tasks)
        total, weights = method.loss((), jnp.asarray(losses), state)
        np.testing.assert_allclose(total, np.sum(np.log(losses + 1e-8)), rtol=1e-12)
        combined, state = method.combine(tree(g), jnp.asarray(losses), weights, state)
        log_grads = g / (losses + 1e-8)[:, None]  # d log l_t / d theta
        buffer = log_grads + beta / k**sigma * (buffer - log_grads)
        norms = np.linalg.norm(buffer, axis=1)
        expected = (norms.max() / (norms + 1e-8)) @ buffer
        np.testing.assert_allclose(flat(combined), expected, rtol=1e-10)
        # Every task's averaged gradient enters with the largest norm.
        scaled = (norms.max() / norms)[:, None] * buffer
        np.testing.assert_allclose(np.linalg.norm(scaled, axis=1), norms.max(), rtol=1e-6)
    with pytest.raises(ValueError, match="shared parameters"):
        method.init(num_tasks)
