"""Gradient methods against float64 references written from their papers (numpy on the
full gradient vectors, scipy for the convex problems), plus each defining property.

The task gradients are random with conflicts; each method's ``combine`` receives them as
a pytree of two leaves with a leading task axis, so the Gram-matrix formulation is
checked against the vector formulation of the papers.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from dgr_jax.methods import get_method, gradients, solvers

DIM = 24


def conflicting(num_tasks, seed):
    """T gradient vectors of size DIM with a shared component and conflicts."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=DIM)
    g = 0.6 * shared + rng.normal(size=(num_tasks, DIM)) * rng.uniform(0.5, 3.0, (num_tasks, 1))
    g[1] = -0.8 * g[0] + 0.3 * rng.normal(size=DIM)  # a strong conflict
    assert (g @ g.T < 0).any()
    return g


def as_tree(g):
    return {"a": jnp.asarray(g[:, :10].reshape(-1, 2, 5)), "b": jnp.asarray(g[:, 10:])}


def from_tree(tree):
    return np.concatenate([np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"])])


def combine(name, g, state=None, **kwargs):
    method = get_method(name, **kwargs)
    _, initial = method.init(g.shape[0], jnp.float64)
    state = initial if state is None else state
    out, state = method.combine(
        as_tree(g), jnp.ones(g.shape[0]), jnp.ones(g.shape[0], jnp.float64), state
    )
    return from_tree(out), state, method


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


TASKS = [2, 3, 5]


# ------------------------------------------------------------------------ solvers


@pytest.mark.parametrize("size", [2, 3, 7])
def test_simplex_projection_is_the_closest_point_of_the_simplex(size):
    rng = np.random.default_rng(size)
    for _ in range(5):
        v = rng.normal(size=size) * 2
        got = np.asarray(solvers.project_to_simplex(jnp.asarray(v)))
        want = optimize.minimize(
            lambda w, v=v: np.sum((w - v) ** 2),
            np.full(size, 1 / size),
            jac=lambda w, v=v: 2 * (w - v),
            bounds=[(0, 1)] * size,
            constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        ).x
        np.testing.assert_allclose(got, want, atol=1e-7)


# ------------------------------------------------------------------------ PCGrad


def pcgrad_reference(g, orders):
    """Yu et al. 2020, Algorithm 1, with the given order of the other tasks per task."""
    out = []
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi -= dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return np.sum(out, axis=0), np.array(out)


@pytest.mark.parametrize("num_tasks", TASKS)
def test_pcgrad_matches_the_paper_for_every_order(num_tasks):
    g = conflicting(num_tasks, 1)
    gram = jnp.asarray(g @ g.T)
    per_task_orders = [
        list(itertools.permutations([j for j in range(num_tasks) if j != i]))
        for i in range(num_tasks)
    ]
    for choice in itertools.islice(itertools.product(*per_task_orders), 30):
        orders = np.array(choice)
        want, _ = pcgrad_reference(g, orders)
        got = np.asarray(gradients.pcgrad_coefficients(gram, jnp.asarray(orders))) @ g
        assert rel(got, want) < 1e-7


def test_pcgrad_leaves_no_conflict_for_two_tasks_and_its_orders_come_from_the_key():
    g = conflicting(2, 2)
    _, projected = pcgrad_reference(g, [[1], [0]])
    assert projected[0] @ g[1] > -1e-9 and projected[1] @ g[0] > -1e-9
    got, _, _ = combine("pcgrad", g)
    assert rel(got, projected.sum(0)) < 1e-7
    orders = gradients._other_tasks(jax.random.PRNGKey(0), 5)
    for i, row in enumerate(np.asarray(orders)):
        assert sorted(row) == [j for j in range(5) if j != i]
    # The key advances: two steps from the same state agree, successive steps differ.
    g5 = conflicting(5, 3)
    first, state, _ = combine("pcgrad", g5)
    again, _, _ = combine("pcgrad", g5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(np.asarray(state.key), np.asarray(jax.random.PRNGKey(5)))


# ------------------------------------------------------------------------ CAGrad


def cagrad_reference(g, c=0.4):
    """Liu et al. 2021 (Algorithm 1), the convex dual solved by SLSQP, rescaled by
    1 + c^2 and summed over tasks as auto-lambda does."""
    num_tasks = len(g)
    a = g @ g.T
    g0 = g.mean(0)
    phi = c * np.linalg.norm(g0)

    def f(w):
        gw = w @ g
        return gw @ g0 + phi * np.linalg.norm(gw)

    w = optimize.minimize(
        f,
        np.full(num_tasks, 1 / num_tasks),
        bounds=[(0, 1)] * num_tasks,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    ).x
    gw = w @ g
    d = g0 + phi / np.linalg.norm(gw) * gw
    del a
    return num_tasks * d / (1 + c**2)


@pytest.mark.parametrize("num_tasks", TASKS)
def test_cagrad_matches_the_convex_problem_solved_by_scipy(num_tasks):
    g = conflicting(num_tasks, 4)
    got, state, _ = combine("cagrad", g)
    assert rel(got, cagrad_reference(g)) < 1e-5
    assert float(state.residual) < 1e-6


# ------------------------------------------------------------------------ MGDA


def min_norm_reference(g):
    num_tasks = len(g)
    w = optimize.minimize(
        lambda w: np.sum((w @ g) ** 2),
        np.full(num_tasks, 1 / num_tasks),
        jac=lambda w: 2 * g @ (w @ g),
        bounds=[(0, 1)] * num_tasks,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    ).x
    return w @ g


@pytest.mark.parametrize("num_tasks", TASKS)
def test_mgda_is_the_min_norm_point_of_the_convex_hull(num_tasks):
    g = conflicting(num_tasks, 5)
    got, state, _ = combine("mgda", g, level="parameters")
    want = num_tasks * min_norm_reference(g)
    assert rel(got, want) < 1e-5
    # Min-norm point d of the hull: <g_t, d> >= ||d||^2 for every t (optimality).
    d = got / num_tasks
    assert np.all(g @ d >= d @ d * (1 - 1e-5))
    assert float(state.residual) < 1e-8


# ------------------------------------------------------------------------ IMTL


def imtl_reference(g):
    """Liu et al. 2021, IMTL-G: alpha_{2:T} = g_1 U^T (D U^T)^-1 on the vectors."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d = g[:1] - g[1:]
    uu = u[:1] - u[1:]
    alpha = g[0] @ uu.T @ np.linalg.inv(d @ uu.T)
    alpha = np.concatenate([[1 - alpha.sum()], alpha])
    return alpha @ g


@pytest.mark.parametrize("num_tasks", TASKS)
def test_imtl_matches_the_paper_and_projects_equally_on_every_task(num_tasks):
    g = conflicting(num_tasks, 6)
    got, state, _ = combine("imtl", g)
    assert rel(got, imtl_reference(g)) < 1e-9
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    projections = unit @ got
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
    assert float(state.residual) < 1e-9


def test_imtl_loss_scales_the_losses_and_learns_the_scale_unless_told_not_to():
    losses = jnp.array([0.5, 2.0, 1.5])
    for learn in (True, False):
        method = get_method("imtl", learn_loss_scale=learn)
        params, state = method.init(3, jnp.float64)
        params = params._replace(loss_scale=jnp.array([0.1, -0.2, 0.3]))
        (total, weights), grad = jax.value_and_grad(method.loss, has_aux=True)(
            params, losses, state
        )
        s = np.array([0.1, -0.2, 0.3])
        np.testing.assert_allclose(total, np.sum(np.exp(s) * losses - s))
        np.testing.assert_allclose(weights, np.exp(s))
        want = np.exp(s) * np.asarray(losses) - 1 if learn else np.zeros(3)
        np.testing.assert_allclose(grad.loss_scale, want, atol=1e-12)


# ------------------------------------------------------------------------ Nash-MTL


@pytest.mark.parametrize("num_tasks", TASKS)
def test_nash_mtl_solves_the_bargaining_equation(num_tasks):
    g = conflicting(num_tasks, 7)
    gram = g @ g.T
    normalised = gram / np.linalg.norm(gram)
    want_alpha = optimize.root(lambda a: normalised @ a - 1 / a, np.ones(num_tasks), tol=1e-14).x
    assert np.all(want_alpha > 0)
    got, state, _ = combine("nash_mtl", g, max_norm=0.0)
    np.testing.assert_allclose(np.asarray(state.alpha), want_alpha, rtol=1e-8)
    assert rel(got, want_alpha @ g) < 1e-8
    alpha = np.asarray(state.alpha)
    np.testing.assert_allclose(normalised @ alpha, 1 / alpha, rtol=1e-8)
    assert float(state.residual) < 1e-8
    # The original clips the shared gradient to norm 1; heads get alpha_t per task.
    clipped, state, method = combine("nash_mtl", g)
    norm = np.linalg.norm(want_alpha @ g)
    np.testing.assert_allclose(clipped, want_alpha @ g * min(1, 1 / (norm + 1e-6)), rtol=1e-8)
    np.testing.assert_allclose(method.head_weights(state, jnp.ones(num_tasks)), want_alpha)


# ------------------------------------------------------------------------ UPGrad


def dual_cone_projection(g, v):
    """argmin_x ||x - v||^2 s.t. g x >= 0, in the primal, by SLSQP."""
    return optimize.minimize(
        lambda x: np.sum((x - v) ** 2),
        v.copy(),
        jac=lambda x: 2 * (x - v),
        constraints={"type": "ineq", "fun": lambda x: g @ x, "jac": lambda x: g},
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 1000},
    ).x


@pytest.mark.parametrize("num_tasks", TASKS)
def test_upgrad_averages_projections_onto_the_dual_cone_and_conflicts_with_no_task(num_tasks):
    g = conflicting(num_tasks, 8)
    want = sum(dual_cone_projection(g, g[i]) for i in range(num_tasks))
    got, state, _ = combine("upgrad", g)
    assert rel(got, want) < 1e-5
    assert np.all(g @ got >= -1e-7 * np.linalg.norm(got) * np.linalg.norm(g, axis=1))
    assert float(state.residual) < 1e-6


# ------------------------------------------------------------------------ Aligned-MTL


@pytest.mark.parametrize("num_tasks", TASKS)
def test_aligned_mtl_matches_the_paper(num_tasks):
    g = conflicting(num_tasks, 9)
    # Senushkin et al. 2023: G = J J^T = V S^2 V^T; B = s_min V S^-1 V^T; J_hat = B J
    # has orthogonal rows of equal norm s_min; the update is 1^T J_hat.
    s2, v = np.linalg.eigh(g @ g.T)
    b = np.sqrt(s2.min()) * v @ np.diag(1 / np.sqrt(s2)) @ v.T
    aligned = b @ g
    gram = aligned @ aligned.T
    np.testing.assert_allclose(gram, s2.min() * np.eye(num_tasks), atol=1e-9 * s2.max())
    got, _, _ = combine("aligned_mtl", g)
    assert rel(got, aligned.sum(0)) < 1e-8


# ------------------------------------------------------------------------ GradVac


def gradvac_reference(g, targets, orders, beta):
    """Wang et al. 2021, Algorithm 1, on whole gradient vectors."""
    targets = targets.copy()
    out = []
    for i in range(len(g)):
        gi = g[i].copy()
        for j in orders[i]:
            cos = gi @ g[j] / (np.linalg.norm(gi) * np.linalg.norm(g[j]))
            t = targets[i, j]
            if cos < t:
                gi = (
                    gi
                    + (
                        np.linalg.norm(gi)
                        * (t * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - t**2))
                        / (np.linalg.norm(g[j]) * np.sqrt(1 - t**2))
                    )
                    * g[j]
                )
            targets[i, j] = (1 - beta) * t + beta * cos
        out.append(gi)
    return np.sum(out, axis=0), targets


@pytest.mark.parametrize("num_tasks", TASKS)
def test_gradvac_matches_the_paper(num_tasks):
    g = conflicting(num_tasks, 10)
    rng = np.random.default_rng(0)
    targets = rng.uniform(-0.3, 0.5, (num_tasks, num_tasks))
    orders = np.array(
        [rng.permutation([j for j in range(num_tasks) if j != i]) for i in range(num_tasks)]
    )
    want, want_targets = gradvac_reference(g, targets, orders, 0.01)
    c, got_targets = gradients.gradvac_coefficients(
        jnp.asarray(g @ g.T), jnp.asarray(targets), jnp.asarray(orders), 0.01
    )
    assert rel(np.asarray(c) @ g, want) < 1e-6
    np.testing.assert_allclose(got_targets, want_targets, atol=1e-7)


# ------------------------------------------------------------------------ GradDrop


def test_graddrop_keeps_one_sign_per_element_with_the_sign_purity_as_probability():
    rng = np.random.default_rng(11)
    g = rng.normal(size=(3, 20000)) + np.array([[0.5], [0.2], [-0.1]])
    u = rng.uniform(size=20000)
    got = np.asarray(gradients.graddrop_combine(jnp.asarray(g), jnp.asarray(u)))
    purity = 0.5 * (1 + g.sum(0) / np.abs(g).sum(0))
    positive = np.where(g > 0, g, 0).sum(0)
    negative = np.where(g < 0, g, 0).sum(0)
    # Chen et al. 2020: where P > U the positive components survive, else the negative.
    want = np.where(purity > u, positive, negative)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    same_sign = np.all(g > 0, axis=0) | np.all(g < 0, axis=0)
    np.testing.assert_allclose(got[same_sign], g.sum(0)[same_sign], rtol=1e-12)
    # Through the method, with uniforms from its key: each element is one of the two sums,
    # the positive one about P of the time.
    out, _, _ = combine_raw("graddrop", g)
    is_positive = np.isclose(out, positive) & ~np.isclose(positive, negative)
    mixed = ~same_sign
    assert np.all(np.isclose(out, positive) | np.isclose(out, negative))
    assert abs(is_positive[mixed].mean() - purity[mixed].mean()) < 0.02


def combine_raw(name, g):
    method = get_method(name)
    _, state = method.init(g.shape[0], jnp.float64)
    out, state = method.combine(jnp.asarray(g), jnp.ones(g.shape[0]), jnp.ones(g.shape[0]), state)
    return np.asarray(out), state, method


# ------------------------------------------------------------------------ all of them


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad", "gradvac", "graddrop"])
def test_identical_task_gradients_give_their_sum(name):
    g = np.tile(np.random.default_rng(12).normal(size=DIM), (3, 1))
    if name == "graddrop":
        got, _, _ = combine_raw(name, g)
    else:
        got, _, _ = combine(name, g)
    assert rel(got, g.sum(0)) < 1e-5


@pytest.mark.parametrize(
    "name", ["pcgrad", "cagrad", "mgda", "imtl", "nash_mtl", "upgrad", "aligned_mtl", "gradvac"]
)
def test_combine_runs_under_jit_in_float32(name):
    g = conflicting(3, 13).astype(np.float32)
    method = get_method(name)
    _, state = method.init(3)
    tree = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), as_tree(g))
    out, _ = jax.jit(method.combine)(
        tree, jnp.ones(3, jnp.float32), jnp.ones(3, jnp.float32), state
    )
    want, _, _ = combine(name, g.astype(np.float64))
    assert rel(from_tree(out), want) < 2e-3
