"""A small, self-contained demonstration of dgr_penalty on built-in data.

    python -m experiments.penalty_demo            # about half a minute on 2 CPU cores

A tanh MLP encoder with two task heads (10-way classification and regression) learns
a synthetic two-task problem drawn from a fixed random teacher. K stacked dummy head
sets read the same features. The demo

1. compares the three penalty methods on one batch: value, seconds per jitted
   gradient call, and the gradient w.r.t. the encoder against ``double_backprop``;
2. trains twice from the same start and data, with and without DGR, and prints the
   dummy-gradient norm and task losses: the penalty drives the dummy norm down.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dgr_jax import PENALTY_ESTIMATORS, heads_penalty, init_dummy_sets

NUM_CLASSES = 10


class Encoder(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.width)(x))
        return jnp.tanh(nn.Dense(self.width)(x))


class Heads(nn.Module):
    @nn.compact
    def __call__(self, z):
        return {
            "digit": nn.Dense(NUM_CLASSES, name="digit")(z),
            "value": nn.Dense(1, name="value")(z)[:, 0],
        }


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def squared_error(prediction, target):
    return jnp.mean(jnp.square(prediction - target))


TASK_LOSSES = {"digit": cross_entropy, "value": squared_error}


def make_data(key, num_examples, num_inputs):
    """Inputs and two related targets from a fixed random teacher network."""
    k_x, k_w, k_v = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (num_examples, num_inputs), jnp.float32)
    hidden = jnp.tanh(x @ jax.random.normal(k_w, (num_inputs, 16), jnp.float32))
    teacher = jax.random.normal(k_v, (16, NUM_CLASSES), jnp.float32)
    scores = hidden @ teacher
    return x, {"digit": jnp.argmax(scores, axis=1), "value": jnp.max(scores, axis=1)}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.penalty_demo",
        description="Demonstrate dgr_penalty: exact vs reference vs finite difference, "
        "and its effect on training, on a built-in synthetic two-task problem.",
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps per run (default 300)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=128, help="examples per step (default 128)"
    )
    parser.add_argument("--width", type=int, default=64, help="encoder width (default 64)")
    parser.add_argument(
        "--num_dummy", type=int, default=3, help="K, the number of dummy head sets (default 3)"
    )
    parser.add_argument(
        "--dgr_weight",
        type=float,
        default=0.3,
        help="lambda, the penalty weight of the DGR run (default 0.3)",
    )
    parser.add_argument(
        "--dgr_method",
        choices=PENALTY_ESTIMATORS,
        default="exact",
        help="penalty gradient used for training (default exact)",
    )
    parser.add_argument(
        "--fd_eps", type=float, default=1e-3, help="finite-difference step (default 1e-3)"
    )
    parser.add_argument(
        "--squared_norm", action="store_true", help="penalise ||g||^2 instead of ||g||"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "width", "num_dummy"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dgr_weight < 0:
        parser.error(f"--dgr_weight must be >= 0, got {args.dgr_weight}")
    if args.fd_eps <= 0:
        parser.error(f"--fd_eps must be > 0, got {args.fd_eps}")
    return args


def median_seconds(fn, *args, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    key_data, key_enc, key_heads, key_dummy = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    x, targets = make_data(key_data, args.steps * args.batch_size, 32)
    encoder, heads = Encoder(args.width), Heads()
    encoder_params = encoder.init(key_enc, x[:1])["params"]
    sample_z = encoder.apply({"params": encoder_params}, x[:1])
    head_params = heads.init(key_heads, sample_z)["params"]
    dummy_sets = init_dummy_sets(heads, key_dummy, args.num_dummy, sample_z)

    def apply_heads(params, z):
        return heads.apply({"params": params}, z)

    def penalty(z, batch_targets, method):
        return heads_penalty(
            apply_heads,
            dummy_sets,
            z,
            batch_targets,
            TASK_LOSSES,
            estimator=method,
            squared=args.squared_norm,
            fd_eps=args.fd_eps,
        )

    # 1. The three methods on one batch.
    batch_x = x[: args.batch_size]
    batch_t = jax.tree_util.tree_map(lambda a: a[: args.batch_size], targets)
    print(
        f"dgr_penalty on one batch: {args.batch_size} examples, width {args.width}, "
        f"K={args.num_dummy} dummy sets, squared={args.squared_norm}"
    )
    print(f"{'method':<18} {'value':>10} {'ms/grad':>9} {'rel err vs double_backprop':>27}")
    grads = {}
    for method in ("double_backprop", "exact", "finite_difference"):
        fn = jax.jit(
            jax.value_and_grad(
                lambda p, m=method: penalty(encoder.apply({"params": p}, batch_x), batch_t, m)
            )
        )
        value, grads[method] = fn(encoder_params)
        seconds = median_seconds(fn, encoder_params)
        reference, _ = ravel_pytree(grads["double_backprop"])
        mine, _ = ravel_pytree(grads[method])
        err = float(jnp.linalg.norm(mine - reference) / jnp.linalg.norm(reference))
        print(f"{method:<18} {float(value):>10.5f} {1e3 * seconds:>9.2f} {err:>27.2e}")

    # 2. Training with and without DGR from the same start and data.
    optimizer = optax.sgd(args.lr, momentum=0.9)

    def make_step(dgr_weight):
        def total_loss(trainable, bx, bt):
            z = encoder.apply({"params": trainable["encoder"]}, bx)  # encoder runs once
            outputs = apply_heads(trainable["heads"], z)
            task = {t: TASK_LOSSES[t](outputs[t], bt[t]) for t in TASK_LOSSES}
            dummy_norm = penalty(z, bt, args.dgr_method)
            objective = sum(task.values()) + (dgr_weight * dummy_norm if dgr_weight else 0.0)
            return objective, (task, dummy_norm)

        @jax.jit
        def step(trainable, opt_state, bx, bt):
            grads, (task, dummy_norm) = jax.grad(total_loss, has_aux=True)(trainable, bx, bt)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(trainable, updates), opt_state, task, dummy_norm

        return step

    print(f"\ntraining {args.steps} steps, SGD lr {args.lr}, DGR method {args.dgr_method}")
    print(f"{'run':<14} {'digit CE':>9} {'value MSE':>10} {'dummy grad norm':>16} {'seconds':>8}")
    for name, weight in (("vanilla", 0.0), (f"DGR λ={args.dgr_weight:g}", args.dgr_weight)):
        trainable = {"encoder": encoder_params, "heads": head_params}
        opt_state = optimizer.init(trainable)
        step = make_step(weight)
        start = time.perf_counter()
        window = []
        for i in range(args.steps):
            sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
            trainable, opt_state, task, dummy_norm = step(
                trainable, opt_state, x[sl], jax.tree_util.tree_map(lambda a, sl=sl: a[sl], targets)
            )
            window.append((task["digit"], task["value"], dummy_norm))
            window = window[-20:]
        means = [float(jnp.mean(jnp.stack(col))) for col in zip(*window)]
        if not all(map(lambda v: v == v, means)):
            sys.exit(f"penalty_demo: run {name!r} diverged (NaN loss); try a smaller --lr")
        print(
            f"{name:<14} {means[0]:>9.4f} {means[1]:>10.4f} {means[2]:>16.4f} "
            f"{time.perf_counter() - start:>8.1f}"
        )
    print("(losses and norms: mean of the last 20 steps)")


if __name__ == "__main__":
    main()
