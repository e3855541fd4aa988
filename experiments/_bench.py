"""Shared pieces of the benchmark commands: timing, device description, tables."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from dgr_jax.models import BACKBONES


def add_common_flags(parser: argparse.ArgumentParser, repeats_of: str):
    """Flags both benchmarks take: input size, backbone and widths, repeats, eps, --json."""
    parser.add_argument(
        "--height", type=int, default=96, help="input height (default 96; NYUv2 is 288)"
    )
    parser.add_argument(
        "--width", type=int, default=128, help="input width (default 128; NYUv2 is 384)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=2, help="batch size (default 2; the paper uses 4)"
    )
    parser.add_argument(
        "--backbone",
        default="resnet50",
        choices=sorted(BACKBONES) + ["18", "34", "50", "101"],
        help="the trunk (default resnet50; a bare ResNet depth works too)",
    )
    parser.add_argument(
        "--base_width",
        type=int,
        default=64,
        help="ResNet base width (64 = real; smaller for smoke tests)",
    )
    parser.add_argument("--head_width", type=int, default=256, help="ASPP width (256 = real)")
    parser.add_argument(
        "--repeats", type=int, default=3, help=f"timed {repeats_of} after one warm-up (default 3)"
    )
    parser.add_argument(
        "--fd_eps", type=float, default=1e-3, help="finite-difference step (default 1e-3)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")


def check_common_flags(parser: argparse.ArgumentParser, args, extra_positive=()):
    """One-line parser errors for sizes < 1 and a non-positive finite-difference step."""
    for name in (
        "height",
        "width",
        "batch_size",
        "repeats",
        "base_width",
        "head_width",
        *extra_positive,
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.fd_eps <= 0:
        parser.error(f"--fd_eps must be > 0, got {args.fd_eps}")


def device_description() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind
    extra = f", {os.cpu_count()} host cores" if devices[0].platform == "cpu" else ""
    return f"{len(devices)} x {kind} ({devices[0].platform}{extra}), jax {jax.__version__}"


def compile_and_time(fn, args, repeats: int, *, threaded_state: bool = False):
    """Compile ``jax.jit(fn)`` for ``args``; return (compiled, compile_s, median_s, last_output).

    With ``threaded_state`` the first output is fed back as the first argument on the
    next call (a donated train state).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,) if threaded_state else ()).lower(*args).compile()
    compile_s = time.perf_counter() - start
    args = list(args)
    output = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        if threaded_state:
            args[0] = output[0]
        start = time.perf_counter()
        output = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compiled, compile_s, statistics.median(times), output


def peak_memory_mb() -> dict:
    """Peak resident set size of this process, and peak device memory where reported."""
    result = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    return result


def print_table(header: list[str], rows: list[list]):
    cells = [header] + [
        [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def run_in_child(module: str, argv: list[str], label: str) -> dict:
    """``python -m module *argv`` in a fresh process (so its peak memory is its own); the
    JSON object on the last line of its stdout. A failing child ends the run in one line
    after the tail of its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{module.rsplit('.', 1)[-1]}: {label} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: str | None, payload: dict):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def flat_rel_err_and_cosine(a, b) -> tuple[float, float]:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(b)])
    return (
        float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
    )


def random_batch(tasks, batch_size: int, height: int, width: int, seed: int = 0) -> dict:
    """Images and targets of the right shapes, dtypes and invalid values (for timing),
    each target from its task kind's ``example_target``."""
    rng = np.random.default_rng(seed)
    batch = {"image": rng.uniform(-1, 1, (batch_size, height, width, 3)).astype(np.float32)}
    for task in tasks:
        batch[task.name] = task.record.example_target(task, rng, batch_size, height, width)
    return batch


def split_train_step(args, dgr, method=None, model=None, tasks=None, regularizer=None):
    """The benchmarked set-up: the Split network of ``args`` (backbone, widths) on NYUv2's
    tasks, SGD with momentum, a random batch (with a second one under ``heldout/`` keys
    for a look-ahead method), the train state and the un-jitted step. Returns
    ``(net, state, batch, step)``. ``model``: a whole ``ModelConfig`` (a run's network,
    stage sizes included) instead of the one ``args`` describes; ``tasks``: a run's tasks
    instead of NYUv2's three; ``regularizer``: a ``dgr_jax.regularizers.Regularizer`` (SAM,
    PTA) for the network and the step."""
    import optax

    from dgr_jax.models import ModelConfig, build_model
    from dgr_jax.tasks import NYUV2
    from dgr_jax.train import HELDOUT, init_train_state, make_train_step

    if model is None:
        model = ModelConfig(
            network="split",
            backbone=args.backbone,
            base_width=args.base_width,
            head_width=args.head_width,
        )
    tasks = NYUV2 if tasks is None else tuple(tasks)
    net = build_model(model, tasks)
    if regularizer is not None:
        net = regularizer.network(net)
    optimizer = optax.sgd(0.1, momentum=0.9)
    batch = random_batch(tasks, args.batch_size, args.height, args.width)
    if method is not None and method.lookahead is not None:
        heldout = random_batch(tasks, args.batch_size, args.height, args.width, seed=1)
        batch = {**batch, **{HELDOUT + k: v for k, v in heldout.items()}}
    state = jax.jit(  # jitted: op by op, the first initialisation takes far longer
        lambda key, images: init_train_state(net, optimizer, key, images, args.num_dummy, method)
    )(jax.random.PRNGKey(0), batch["image"])
    return (
        net,
        state,
        batch,
        make_train_step(net, tasks, dgr, optimizer, method, regularizer=regularizer),
    )
