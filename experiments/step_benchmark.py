"""Benchmark a whole Split train step: vanilla, DGR exact, DGR finite difference, the paper's DGR.

    python -m experiments.step_benchmark [--json step.json]
    python -m experiments.step_benchmark --height 288 --width 384 --batch_size 4   # real NYUv2 size (GPU)

A full train step of the Split network (dilated ResNet, three DeepLabV3 heads for
NYUv2's tasks; gradients for encoder and heads; SGD with momentum) in four modes:

  vanilla                 task losses only
  dgr_exact               + lambda * penalty of K dummy sets, forward-over-reverse, encoder run once
  dgr_finite_difference   the same, with the paper's finite difference at the feature level
  dgr_paper               the original algorithm: per dummy set the whole model runs forward
                          again with the perturbed set, two more backward passes through the
                          encoder (it estimates the gradient of the squared norm)

Each mode runs in its own process so that its peak memory is its own. Reported: median
seconds per step, compile seconds, peak resident memory (and peak device memory on
accelerators).
"""

from __future__ import annotations

import argparse
import json

from experiments import _bench

MODES = {
    "vanilla": None,
    "dgr_exact": "exact",
    "dgr_finite_difference": "finite_difference",
    "dgr_paper": "paper",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.step_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_common_flags(parser, "steps per mode")
    parser.add_argument("--num_dummy", type=int, default=3, help="K, dummy sets (default 3)")
    parser.add_argument(
        "--dgr_weight",
        type=float,
        default=0.1,
        help="lambda (default 0.1; does not change the cost)",
    )
    parser.add_argument(
        "--dummy_batching",
        choices=("auto", "vmap", "unroll"),
        default="auto",
        help="how DGR modes batch the K dummy sets: vmap, unroll (one after another), "
        "or auto = unroll on CPU, vmap on accelerators (default auto)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="modes to run (default all)",
    )
    parser.add_argument("--child_mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _bench.check_common_flags(parser, args, extra_positive=("num_dummy",))
    if args.dgr_weight < 0:
        parser.error(f"--dgr_weight must be >= 0, got {args.dgr_weight}")
    return args


def run_mode(args) -> dict:
    """Time one mode in this process; returns its figures."""

    from dgr_jax.objective import DGRConfig

    method = MODES[args.child_mode]
    dgr = DGRConfig(
        weight=0.0 if method is None else args.dgr_weight,
        num_dummy=args.num_dummy,
        estimator=method or "exact",
        fd_eps=args.fd_eps,
        squared=method == "paper",
        unroll_sets={"auto": None, "vmap": False, "unroll": True}[args.dummy_batching],
    )
    _, state, batch, step = _bench.split_train_step(args, dgr)
    _, compile_s, median_s, (_, metrics) = _bench.compile_and_time(
        step, (state, batch), args.repeats, threaded_state=True
    )
    loss = float(metrics["loss/total"])
    if loss != loss:
        raise SystemExit(f"step_benchmark: mode {args.child_mode} produced a NaN loss")
    return {
        "median_s": median_s,
        "compile_s": compile_s,
        **_bench.peak_memory_mb(),
        "device": _bench.device_description(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.child_mode:
        print(json.dumps(run_mode(args)))
        return None
    from dgr_jax.models import backbone_name

    config = {k: v for k, v in vars(args).items() if k not in ("json", "child_mode", "modes")}
    forwarded = [token for name, value in config.items() for token in (f"--{name}", str(value))]
    results, device = {}, None
    print(
        f"Split {backbone_name(args.backbone)} (dilated) train step, input {args.height}x{args.width}, "
        f"batch {args.batch_size}, K={args.num_dummy}, lambda={args.dgr_weight}",
        flush=True,
    )
    for mode in args.modes:
        print(f"  running {mode} in its own process ...", flush=True)
        figures = _bench.run_in_child(
            "experiments.step_benchmark", [*forwarded, "--child_mode", mode], f"mode {mode}"
        )
        device = figures.pop("device")
        results[mode] = figures
    print(f"device: {device}\n")
    memory_key = (
        "peak_device_mb" if any("peak_device_mb" in r for r in results.values()) else "peak_rss_mb"
    )
    _bench.print_table(
        ["mode", "median_s", "compile_s", memory_key],
        [
            [m, r["median_s"], r["compile_s"], f"{r.get(memory_key, float('nan')):.0f}"]
            for m, r in results.items()
        ],
    )
    ratios = {}
    if "dgr_exact" in results:
        for other in ("dgr_paper", "dgr_finite_difference", "vanilla"):
            if other in results:
                ratios[f"dgr_exact/{other}"] = (
                    results["dgr_exact"]["median_s"] / results[other]["median_s"]
                )
        print("  ".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    _bench.write_json(
        args.json, {"modes": results, "ratios": ratios, "device": device, "config": config}
    )
    return results


if __name__ == "__main__":
    main()
