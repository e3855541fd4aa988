"""Benchmark the three dgr_penalty methods on one real DeepLabV3 head set.

    python -m experiments.penalty_benchmark [--json penalty.json]

One set of DeepLabV3 heads for the three NYUv2 tasks (13-class seg, depth, normals)
reads dilated-ResNet-50 features of a 96x128 input, batch 2 (features 2x12x16x2048).
For each method: median seconds per jitted call of the gradient of the penalty with
respect to the features, compile seconds, and relative error / cosine against
``double_backprop`` (the literal reference). Features come from a randomly initialised
encoder in training mode; targets are random with 10% invalid pixels.
"""

from __future__ import annotations

import argparse

import jax

from dgr_jax import dgr_penalty, multitask_dummy_loss
from dgr_jax.models import ModelConfig, build_model, count_params, heads_apply_fn
from dgr_jax.penalty import PENALTY_ESTIMATORS
from dgr_jax.tasks import NYUV2, task_losses
from experiments import _bench


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.penalty_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_common_flags(parser, "calls per method")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=PENALTY_ESTIMATORS,
        default=list(PENALTY_ESTIMATORS),
        help="methods to time (double_backprop is always run: it is the reference)",
    )
    parser.add_argument(
        "--no_float64_truth",
        action="store_true",
        help="skip the float64 exact gradient used as ground truth for every method's error",
    )
    args = parser.parse_args(argv)
    _bench.check_common_flags(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    config = ModelConfig(
        network="split",
        backbone=args.backbone,
        base_width=args.base_width,
        head_width=args.head_width,
    )
    net = build_model(config, NYUV2)
    batch = _bench.random_batch(NYUV2, args.batch_size, args.height, args.width)
    key_model, key_dummy = jax.random.split(jax.random.PRNGKey(0))
    variables = net.init(key_model, batch["image"], train=False)
    features, _ = jax.jit(
        lambda v, x: net.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key_dummy}
        )[0]
    )(variables, batch["image"])
    size = (args.height, args.width)
    dummy = net.heads.init(key_dummy, features, size, train=False)["params"]
    loss_fn = multitask_dummy_loss(heads_apply_fn(net.heads, size), task_losses(NYUV2))
    targets = {t.name: batch[t.name] for t in NYUV2}
    print(f"device: {_bench.device_description()}")
    print(
        f"penalty of one DeepLabV3 head set ({count_params(dummy):,} params) on features "
        f"{tuple(features.shape)} from {config.backbone} (dilated), input {size}, "
        f"batch {args.batch_size}; gradient w.r.t. the features"
    )

    methods = ["double_backprop"] + [m for m in args.methods if m != "double_backprop"]
    results, grads = {}, {}
    for method in methods:

        def grad_fn(z, method=method):
            return jax.grad(
                lambda z: dgr_penalty(
                    loss_fn, dummy, z, targets, estimator=method, fd_eps=args.fd_eps
                )
            )(z)

        print(f"  timing {method} ...", flush=True)
        _, compile_s, median_s, grads[method] = _bench.compile_and_time(
            grad_fn, (features,), args.repeats
        )
        rel_err, cos = _bench.flat_rel_err_and_cosine(grads[method], grads["double_backprop"])
        results[method] = {
            "median_s": median_s,
            "compile_s": compile_s,
            "rel_err": rel_err,
            "cosine": cos,
        }

    if not args.no_float64_truth:
        # Ground truth: the exact method in float64 (proved equal to a brute-force
        # Hessian in the tests). Measures each float32 method's distance from the truth.
        print("  computing the float64 ground truth ...", flush=True)
        jax.config.update("jax_enable_x64", True)
        as64 = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda a: a.astype("float64") if a.dtype.kind == "f" else a, tree
        )
        dummy64, targets64 = as64(dummy), as64(targets)
        truth = jax.jit(jax.grad(lambda z: dgr_penalty(loss_fn, dummy64, z, targets64)))(
            as64(features)
        )
        for method, result in results.items():
            result["rel_err_vs_float64"], result["cosine_vs_float64"] = (
                _bench.flat_rel_err_and_cosine(grads[method], truth)
            )

    print()
    header = ["method", "median_s", "compile_s", "rel_err vs double_backprop", "cosine"]
    if not args.no_float64_truth:
        header += ["rel_err vs f64 truth", "cosine vs f64 truth"]
    rows = [
        [m, r["median_s"], r["compile_s"], f"{r['rel_err']:.2e}", f"{r['cosine']:.6f}"]
        + (
            [f"{r['rel_err_vs_float64']:.2e}", f"{r['cosine_vs_float64']:.6f}"]
            if not args.no_float64_truth
            else []
        )
        for m, r in results.items()
    ]
    _bench.print_table(header, rows)
    if "exact" in results and "finite_difference" in results:
        print(
            f"exact / finite_difference time: {results['exact']['median_s'] / results['finite_difference']['median_s']:.2f}; "
            f"exact / double_backprop time: {results['exact']['median_s'] / results['double_backprop']['median_s']:.2f}"
        )
    _bench.write_json(
        args.json,
        {
            "methods": results,
            "device": _bench.device_description(),
            "config": {k: v for k, v in vars(args).items() if k != "json"},
        },
    )
    return results


if __name__ == "__main__":
    main()
