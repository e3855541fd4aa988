"""Benchmark the Split train step under every MTL method, without and with DGR, SAM, PTA.

    python -m experiments.method_benchmark [--json methods.json]
    python -m experiments.method_benchmark --methods equal pcgrad nash_mtl --no_dgr
    python -m experiments.method_benchmark --methods equal --regularizers sam pta

The Split network (dilated ResNet, NYUv2's three DeepLabV3 heads, SGD with momentum) at
96x128, batch 2, K = 3 dummy sets by default. Each (method, DGR) configuration runs in
its own process so that its peak memory is its own. ``--regularizers`` adds each method
under the comparison regularisers (SAM: two gradient passes per step; PTA:
``--pta_decoders`` decoders per task), DGR off. Reported per configuration: median
seconds per step, the ratio to the equal-weighting step without DGR ("vanilla"), compile
seconds, peak memory, the method's solver residual after the timed steps, and for
gradient methods the time of ``combine`` alone (Gram matrix, solver, weighted sum) on task
gradients of the real shapes, and of its solver alone (``combine`` on 64-wide task
gradients: the T x T problem), each with its share of the step.

JSON: ``{"methods": {NAME: {"median_s", "ratio_to_vanilla", ...}}, "methods_dgr":
{...}, "methods_sam": {...}, "methods_pta": {...}, "device": ..., "config": ...}``.
"""

from __future__ import annotations

import argparse
import json

from experiments import _bench

REGULARIZED = ("sam", "pta")  # the comparison regularisers the benchmark can add
# mode -> (the JSON group of its rows, the suffix of its rows' names)
GROUPS = {
    "plain": ("methods", ""),
    "dgr": ("methods_dgr", " + DGR"),
    "sam": ("methods_sam", " + SAM"),
    "pta": ("methods_pta", " + PTA"),
}


def parse_args(argv=None):
    from dgr_jax.methods import METHODS
    from dgr_jax.pta import DEFAULT_DECODERS
    from dgr_jax.regularizers import DEFAULT_SAM_RHO

    parser = argparse.ArgumentParser(
        prog="python -m experiments.method_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_common_flags(parser, "steps per configuration")
    parser.add_argument("--num_dummy", type=int, default=3, help="K, dummy sets (default 3)")
    parser.add_argument(
        "--dgr_weight", type=float, default=0.1, help="lambda with DGR (default 0.1)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=list(METHODS),
        help="methods to run (default all; equal is always run, it is the reference)",
    )
    parser.add_argument(
        "--no_dgr",
        action="store_true",
        help="only the configurations without a regulariser (no DGR, SAM or PTA rows)",
    )
    parser.add_argument(
        "--regularizers",
        nargs="*",
        choices=REGULARIZED,
        default=list(REGULARIZED),
        help="also run every method under these regularisers, DGR off (default: sam pta; "
        "none given, or --no_dgr: neither)",
    )
    parser.add_argument(
        "--sam_rho",
        type=float,
        default=DEFAULT_SAM_RHO,
        help=f"SAM's rho (default {DEFAULT_SAM_RHO:g}; it does not change the cost)",
    )
    parser.add_argument(
        "--pta_decoders",
        type=int,
        default=DEFAULT_DECODERS,
        help=f"PTA's decoders per task (default {DEFAULT_DECODERS})",
    )
    parser.add_argument("--child", metavar="METHOD:MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _bench.check_common_flags(parser, args, extra_positive=("num_dummy", "pta_decoders"))
    if args.sam_rho <= 0:
        parser.error(f"--sam_rho must be > 0, got {args.sam_rho}")
    if args.dgr_weight <= 0:
        parser.error(f"--dgr_weight must be > 0, got {args.dgr_weight}")
    return args


def run_child(args) -> dict:
    """Time one (method, DGR) configuration in this process."""
    import jax
    import jax.numpy as jnp

    from dgr_jax import regularizers
    from dgr_jax.methods import get_method
    from dgr_jax.objective import DGRConfig
    from dgr_jax.tasks import NYUV2

    name, mode = args.child.split(":")
    method = get_method(name)
    dgr = DGRConfig(weight=args.dgr_weight if mode == "dgr" else 0.0, num_dummy=args.num_dummy)
    regularizer = {
        "sam": lambda: regularizers.sam(args.sam_rho),
        "pta": lambda: regularizers.pta(args.pta_decoders),
    }.get(mode, lambda: None)()
    net, state, batch, step = _bench.split_train_step(args, dgr, method, regularizer=regularizer)
    _, compile_s, median_s, (state, metrics) = _bench.compile_and_time(
        step, (state, batch), args.repeats, threaded_state=True
    )
    if not all(bool(jnp.isfinite(v)) for v in metrics.values()):
        raise SystemExit(f"method_benchmark: {name} produced a non-finite metric")
    figures = {"median_s": median_s, "compile_s": compile_s}
    if "method/residual" in metrics:
        figures["residual"] = float(metrics["method/residual"])
    if method.needs_task_grads:
        # combine alone, on random task gradients of the shapes it gets in the step.
        if method.level == "representation":
            features = net.encoder.apply(
                {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
                batch["image"],
                train=False,
            )
            shared = features
        else:
            shared = state.params["encoder"]
        keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree_util.tree_leaves(shared))))
        task_grads = jax.tree_util.tree_map(
            lambda x: jax.random.normal(next(keys), (len(NYUV2),) + x.shape, x.dtype), shared
        )
        losses = jnp.ones(len(NYUV2))
        _, combine_s, combine_median, _ = _bench.compile_and_time(
            lambda g, s: method.combine(g, losses, losses, s),
            (task_grads, state.method_state),
            args.repeats,
        )
        figures["combine_s"] = combine_median
        figures["combine_share"] = combine_median / median_s
        # The solver alone: combine on 64-wide task gradients, where the T x T problem
        # (Gram matrix, solve, projections) is all there is to time.
        small = {"g": jax.random.normal(jax.random.PRNGKey(2), (len(NYUV2), 64))}
        _, small_state = (
            method.init(len(NYUV2), shared={"g": small["g"][0]})
            if method.shared_state
            else method.init(len(NYUV2))
        )
        _, _, solver_median, _ = _bench.compile_and_time(
            lambda g, s: method.combine(g, losses, losses, s), (small, small_state), args.repeats
        )
        figures["solver_s"] = solver_median
        figures["solver_share"] = solver_median / median_s
    return {**figures, **_bench.peak_memory_mb(), "device": _bench.device_description()}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return None
    from dgr_jax.models import backbone_name

    config = {
        k: v
        for k, v in vars(args).items()
        if k not in ("json", "child", "methods", "no_dgr", "regularizers")
    }
    forwarded = [token for name, value in config.items() for token in (f"--{name}", str(value))]
    names = ["equal"] + [m for m in args.methods if m != "equal"]
    print(
        f"Split {backbone_name(args.backbone)} (dilated) train step per MTL method, input "
        f"{args.height}x{args.width}, batch {args.batch_size}; with DGR: K={args.num_dummy}, "
        f"lambda={args.dgr_weight}; SAM rho={args.sam_rho}; PTA {args.pta_decoders} decoders per task",
        flush=True,
    )
    modes = ["plain"] + ([] if args.no_dgr else ["dgr", *args.regularizers])
    results = {group: {} for group, _ in GROUPS.values()}
    device = None
    for mode in modes:
        group, suffix = GROUPS[mode]
        for name in names:
            label = name + suffix
            print(f"  running {label} in its own process ...", flush=True)
            figures = _bench.run_in_child(
                "experiments.method_benchmark",
                [*forwarded, "--child", f"{name}:{mode}"],
                label,
            )
            device = figures.pop("device")
            results[group][name] = figures
    vanilla = results["methods"]["equal"]["median_s"]
    memory_key = (
        "peak_device_mb" if "peak_device_mb" in results["methods"]["equal"] else "peak_rss_mb"
    )
    rows = []
    for group, suffix in GROUPS.values():
        for name, figures in results[group].items():
            figures["ratio_to_vanilla"] = figures["median_s"] / vanilla
            rows.append(
                [
                    name + suffix,
                    figures["median_s"],
                    f"{figures['ratio_to_vanilla']:.2f}",
                    figures["compile_s"],
                    f"{figures.get(memory_key, float('nan')):.0f}",
                    f"{figures['residual']:.1e}" if "residual" in figures else "-",
                    f"{100 * figures['combine_share']:.1f}%" if "combine_share" in figures else "-",
                    f"{100 * figures['solver_share']:.2f}%" if "solver_share" in figures else "-",
                ]
            )
    print(f"device: {device}\n")
    _bench.print_table(
        [
            "method",
            "median_s",
            "ratio",
            "compile_s",
            memory_key,
            "residual",
            "combine/step",
            "solver/step",
        ],
        rows,
    )
    _bench.write_json(args.json, {**results, "device": device, "config": config})
    return results


if __name__ == "__main__":
    main()
