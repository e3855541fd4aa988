"""The DGR penalty's gradient estimators side by side: fidelity, cost and training.

    python -m experiments.ablation                       # built-in NYUv2 scenes, CPU sizes: minutes
    python -m experiments.ablation --data_dir ~/data/nyuv2 --epochs 200 --pretrained resnet50.safetensors

1. Fidelity. The gradient of the DGR penalty P (the mean over the K dummy sets of
   ||grad_phi L_d||) with respect to the encoder's features z, through the run's
   DeepLabV3 heads in BatchNorm training mode, as the train step takes it. For every
   --eps and --precisions, the finite difference (dgr_penalty, estimator
   finite_difference) against the exact gradient in float64 (estimator exact):
   relative error and cosine. The inputs are the first training batch and the
   features the encoder gives it in training mode, at initialisation and at the end of
   each of --fidelity_epochs of the exact training run (it trains in segments that end
   there, as an interrupted run resumes, and each point reads its checkpoint back).
2. Cost. Seconds per train step, median of --repeats after a warm-up, of every
   --dgr_method and of the vanilla step (DGR off): the step benchmark's code path
   (experiments.step_benchmark) with the run's network, batch and image size.
3. Training. One ordinary run per --methods (experiments.loop.train_and_evaluate, as
   python -m experiments.nyuv2) in <workdir>/<method>, all from the same seed: the
   same initialisation and data order. Curves of the dummy-gradient norm (the train
   step's dgr/penalty), each task's metric and delta_m per epoch; the final metrics.

Writes ablation.md (what the figures show, in numbers), ablation.json, fidelity.png,
cost.png and training.png into --workdir. Finished runs (summary.json), fidelity
points (fidelity/epoch_<N>.json) and the cost table (cost.json) are kept and skipped
by a rerun, an interrupted run is resumed: rerunning the command continues it (compiled
programs are kept in <workdir>/xla_cache, JAX's persistent compilation cache, unless
JAX_COMPILATION_CACHE_DIR names another place). Without --data_dir it runs on
built-in data (--synthetic) with the entry points' CPU preset plus --epochs 4
--synthetic_counts 32,16 --num_dummy 1. Every flag it does not know goes to every
run: --epochs, --backbone, --base_width, --head_width, --num_dummy, --fd_eps,
--squared_norm, --batch_size, --seed, --reference, ... (python -m experiments.nyuv2
--help).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

from experiments.runs import (
    Cell,
    FrozenFeatures,
    RunSetup,
    cell_configs,
    refuse_flags,
    say,
    train_or_skip,
    use_compilation_cache,
)

METHODS = ("exact", "finite_difference", "paper", "double_backprop")
DEFAULT_METHODS = ("exact", "finite_difference", "paper")
EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
PRECISIONS = ("float32", "float64")
# Built-in data: on top of the entry points' CPU preset (ResNet-18 at base width 16,
# heads of width 32), a shorter schedule and one dummy set (the original code's K; the
# programs of K = 3 take three times as long to compile, most of this command's time on
# a CPU), so that the whole command takes minutes. Flags given win: --num_dummy 3.
PRESET = ["--epochs", "4", "--synthetic_counts", "32,16", "--num_dummy", "1"]
# Heads this narrow (or narrower) are "tiny": double backprop trains there too.
TINY_HEAD_WIDTH = 16
# Set by this command for each run.
BLOCKED = ("--dgr_method", "--workdir", "--resume", "--overwrite", "--steps", "--dry_run")
PROG = "python -m experiments.ablation"


# ---------------------------------------------------------------------------
# Flags


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--workdir",
        default="runs/ablation",
        help="where the report, the figures and one folder per run go (default runs/ablation)",
    )
    add(
        "--data_dir",
        metavar="DIR",
        help="the real NYUv2 folder (the mtan / auto-lambda .npy layout); without it, "
        "built-in scenes in that format (--synthetic) at CPU sizes",
    )
    add(
        "--synthetic",
        action="store_true",
        help="built-in data with the CPU preset (the default without --data_dir): "
        + " ".join(PRESET)
        + " on top of python -m experiments.nyuv2 --synthetic's",
    )
    add(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="the --dgr_method of each training run; exact is needed, the fidelity is measured "
        f"at its checkpoints (default {' '.join(DEFAULT_METHODS)}, and double_backprop with "
        f"--with_double_backprop or heads of width <= {TINY_HEAD_WIDTH})",
    )
    add(
        "--with_double_backprop",
        action="store_true",
        help="train with double_backprop too (reverse-over-reverse: slow on CPU at real widths)",
    )
    add(
        "--dgr_weight",
        type=float,
        default=0.1,
        help="lambda of every run (default 0.1)",
    )
    add(
        "--eps",
        nargs="+",
        type=float,
        default=list(EPS),
        help="finite-difference steps of the fidelity measurement (default 1e-1 ... 1e-6); "
        "the FD training run uses --fd_eps (default 1e-3)",
    )
    add(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        default=list(PRECISIONS),
        help="precisions of the fidelity measurement (default float32 float64); the reference "
        "is the exact gradient in float64 (in float32 when only float32 is asked for)",
    )
    add(
        "--fidelity_epochs",
        nargs="+",
        type=int,
        default=None,
        help="measure fidelity at the end of these epochs of the exact run, 0 = at "
        "initialisation (default 0, 1, half-way and the last)",
    )
    add(
        "--cost_methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="the --dgr_method steps to time, beside the vanilla step (default all four)",
    )
    add(
        "--repeats",
        type=int,
        default=3,
        help="timed train steps per method after one warm-up (default 3)",
    )
    return parser


def parse_args(argv=None):
    """``(args, configs)``: this command's flags and one ``RunConfig`` per training run
    (every method of the cost table has one). Errors are parser errors: one line."""

    parser = make_parser()
    args, passed = parser.parse_known_args(argv)
    refuse_flags(parser.error, passed, BLOCKED, "the ablation")
    if args.data_dir is not None and args.synthetic:
        parser.error("--data_dir and --synthetic exclude each other")
    if not args.dgr_weight > 0:
        parser.error(f"--dgr_weight must be > 0, got {args.dgr_weight}")
    bad = [e for e in args.eps if not e > 0]
    if bad:
        parser.error(f"--eps must be > 0, got {bad[0]}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.methods is not None and "exact" not in args.methods:
        parser.error("--methods must include exact: the fidelity is measured at its checkpoints")

    data = ["--data_dir", args.data_dir] if args.data_dir else ["--synthetic", *PRESET]
    base = data + passed + ["--dgr_weight", str(args.dgr_weight)]
    root = Path(args.workdir).expanduser()
    cells = [
        Cell(method, "nyuv2", tuple(base + ["--dgr_method", method]), root / method)
        for method in METHODS
    ]
    configs = dict(zip(METHODS, cell_configs(cells, parser.error)))
    config = configs["exact"]
    epochs = config.train.epochs
    if args.fidelity_epochs is None:
        args.fidelity_epochs = sorted({0, min(1, epochs), epochs // 2, epochs})
    bad = [e for e in args.fidelity_epochs if not 0 <= e <= epochs]
    if bad:
        parser.error(f"--fidelity_epochs must be in 0..{epochs} (--epochs), got {bad[0]}")
    args.fidelity_epochs = sorted(set(args.fidelity_epochs))
    if args.methods is None:
        tiny = config.model.head_width <= TINY_HEAD_WIDTH
        extra = ("double_backprop",) if args.with_double_backprop or tiny else ()
        args.methods = list(DEFAULT_METHODS + extra)
    elif args.with_double_backprop and "double_backprop" not in args.methods:
        args.methods = [*args.methods, "double_backprop"]
    args.methods = [m for m in METHODS if m in args.methods]
    return args, configs


# ---------------------------------------------------------------------------
# Fidelity


def _floating(tree, dtype):
    """Host copies of ``tree`` with its floating-point leaves cast to ``dtype``."""
    import jax
    import numpy as np

    def cast(leaf):
        leaf = np.asarray(leaf)
        return leaf.astype(dtype) if np.issubdtype(leaf.dtype, np.floating) else leaf

    return jax.tree_util.tree_map(cast, jax.device_get(tree))


class Fidelity:
    """The finite-difference penalty gradient against the exact one, w.r.t. the features.

    ``net``, ``tasks``, ``dgr``: the run's network, tasks and DGR configuration (K is
    that of the dummy sets passed; ``dgr.squared``); ``image_size``: the batch's. Each gradient
    is ``jax.grad`` of ``dgr_jax.heads_penalty`` with respect to the features; one jitted
    function gives P, the exact gradient and the finite difference at a traced step, so
    it compiles once per precision for every step and checkpoint.
    """

    def __init__(self, net, tasks, dgr, image_size, eps=EPS, precisions=PRECISIONS):
        import jax

        from dgr_jax import heads_penalty
        from dgr_jax.models import heads_apply_fn
        from dgr_jax.tasks import task_losses

        self.eps, self.precisions = tuple(eps), tuple(precisions)
        self.reference = "float64" if "float64" in self.precisions else "float32"
        apply_heads = heads_apply_fn(net.heads, tuple(image_size))
        losses = task_losses(tasks)
        self.task_names = [t.name for t in tasks]

        def penalty(estimator, dummy_sets, features, targets, fd_eps):
            return heads_penalty(
                apply_heads,
                dummy_sets,
                features,
                targets,
                losses,
                estimator=estimator,
                squared=dgr.squared,
                fd_eps=fd_eps,
                # vmapped: the same value and gradient as the train step's unrolled sets
                # on CPU, in a program that compiles in about half the time
                unroll_sets=False,
            )

        def gradients(dummy_sets, features, targets, fd_eps):
            """``(P, exact gradient, finite-difference gradient at fd_eps)``; fd_eps is
            traced, so one program serves every step."""
            value, exact = jax.value_and_grad(
                lambda z: penalty("exact", dummy_sets, z, targets, fd_eps)
            )(features)
            fd = jax.grad(lambda z: penalty("finite_difference", dummy_sets, z, targets, fd_eps))(
                features
            )
            return value, exact, fd

        self._gradients = jax.jit(gradients)
        self.features = FrozenFeatures(net, mode="train")
        """The encoder's features of ``images`` in training mode (as the train step's):
        ``features(state, images)``."""

    def measure(self, dummy_sets, features, targets, log=lambda _: None) -> dict:
        """``{"penalty", "reference", "exact": {precision: {rel_err, cosine}},
        "finite_difference": {precision: {eps: {rel_err, cosine, norm_ratio}}}}``, each
        gradient against the exact one in ``self.reference`` (float64 numbers)."""
        import jax
        import numpy as np

        from experiments._bench import flat_rel_err_and_cosine

        inputs = jax.device_get((dummy_sets, features, targets))
        order = [self.reference] + [p for p in self.precisions if p != self.reference]
        result = {"reference": self.reference, "exact": {}, "finite_difference": {}}
        reference = None

        def norm(tree):
            return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree)))

        for precision in order:
            with jax.enable_x64(precision == "float64"):
                dtype = np.dtype(precision)
                cast = _floating(inputs, dtype)
                estimates = {}
                for eps in self.eps:
                    value, exact, fd = jax.device_get(self._gradients(*cast, dtype.type(eps)))
                    estimates[eps] = jax.tree_util.tree_leaves(fd)
            exact = jax.tree_util.tree_leaves(exact)
            if reference is None:
                reference = exact
                result["penalty"] = float(value)
                result["exact_grad_norm"] = norm(exact)
            if precision not in self.precisions:
                continue
            rel_err, cosine = flat_rel_err_and_cosine(exact, reference)
            result["exact"][precision] = {"rel_err": rel_err, "cosine": cosine}
            rows = result["finite_difference"][precision] = {}
            for eps, estimate in estimates.items():
                rel_err, cosine = flat_rel_err_and_cosine(estimate, reference)
                rows[repr(eps)] = {
                    "rel_err": rel_err,
                    "cosine": cosine,
                    "norm_ratio": norm(estimate) / norm(reference),
                }
            log(
                f"  {precision}: "
                + ", ".join(f"eps {eps} cos {r['cosine']:.3f}" for eps, r in rows.items())
            )
        return result


# ---------------------------------------------------------------------------
# Runs


def run_fidelity(args, setup: RunSetup, root: Path) -> dict:
    """The fidelity points at the chosen epochs of the exact run, training it on the way
    (in segments that end at those epochs); returns ``{epoch: result}``."""
    config = setup.config
    workdir = root / "exact"
    folder = root / "fidelity"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "eps": [repr(e) for e in args.eps],
        "precisions": sorted(args.precisions),
        "config": config.as_dict(),
    }
    fidelity = None
    results = {}
    for epoch in args.fidelity_epochs:
        step = epoch * setup.steps_per_epoch
        path = folder / f"epoch_{epoch}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                say(f"[fidelity] epoch {epoch} (step {step}): done before, skipped")
                results[epoch] = saved
                continue
        if epoch == 0:
            state = setup.initial_state()
        else:
            train_or_skip(
                config,
                workdir,
                "[training] exact",
                total_steps=setup.total_steps,
                stop_after=step if step < setup.total_steps else None,
                prog=PROG,
            )
            state = setup.restore(workdir, step)
            if state is None:
                say(
                    f"[fidelity] epoch {epoch} (step {step}): the exact run no longer keeps "
                    f"that checkpoint (it went on before this point was asked for); skipped. "
                    f"Remove {workdir} to measure it"
                )
                continue
        if fidelity is None:
            say(
                f"[fidelity] compiling the penalty gradients ({len(args.eps)} steps, "
                f"{' and '.join(args.precisions)}) ..."
            )
            fidelity = Fidelity(
                setup.net,
                setup.tasks,
                config.dgr,
                setup.image_size,
                args.eps,
                args.precisions,
            )
        say(f"[fidelity] epoch {epoch} (step {step}):")
        start = time.perf_counter()
        targets = {t.name: setup.batch[t.name] for t in setup.tasks}
        features = fidelity.features(state, setup.batch["image"])
        result = fidelity.measure(state.dummy_sets, features, targets, log=say)
        result.update(epoch=epoch, step=step, seconds=time.perf_counter() - start)
        result["settings"] = settings
        path.write_text(json.dumps(result, indent=1))
        results[epoch] = result
    return results


def run_cost(args, setup: RunSetup, root: Path) -> dict:
    """Seconds per train step of the vanilla step and of every --dgr_method."""
    import jax

    from dgr_jax.objective import DGRConfig
    from experiments import _bench

    config = setup.config
    shape = {
        "batch_size": int(setup.batch["image"].shape[0]),
        "height": setup.image_size[0],
        "width": setup.image_size[1],
        "num_dummy": config.dgr.num_dummy,
    }
    settings = {
        "tasks": [t.name for t in setup.tasks],
        "model": dataclasses.asdict(config.model),
        "dgr": dataclasses.asdict(config.dgr),
        **shape,
        "repeats": args.repeats,
        "device": _bench.device_description(),
    }
    settings = json.loads(json.dumps(settings))
    path = root / "cost.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            say("[cost] done before, skipped")
            return saved
    sizes = types.SimpleNamespace(**shape)
    modes = {}
    for mode in ["vanilla"] + [m for m in METHODS if m in args.cost_methods]:
        dgr = DGRConfig(
            weight=0.0 if mode == "vanilla" else config.dgr.weight,
            num_dummy=config.dgr.num_dummy,
            estimator="exact" if mode == "vanilla" else mode,
            squared=config.dgr.squared,
            fd_eps=config.dgr.fd_eps,
            unroll_sets=config.dgr.unroll_sets,
        )
        say(f"[cost] timing the {mode} step ...")
        _, state, batch, step = _bench.split_train_step(
            sizes, dgr, model=config.model, tasks=setup.tasks
        )
        _, compile_s, median_s, (_, metrics) = _bench.compile_and_time(
            step, (state, batch), args.repeats, threaded_state=True
        )
        loss = float(metrics["loss/total"])
        if not math.isfinite(loss):
            raise SystemExit(f"{PROG}: the {mode} step gave a non-finite loss")
        modes[mode] = {"median_s": median_s, "compile_s": compile_s}
        say(f"  {median_s:.3f} s/step (compiled in {compile_s:.1f} s)")
        del state, batch
        jax.clear_caches()
    for figures in modes.values():
        figures["vs_vanilla"] = figures["median_s"] / modes["vanilla"]["median_s"]
        if "exact" in modes:
            figures["vs_exact"] = figures["median_s"] / modes["exact"]["median_s"]
    result = {"modes": modes, "settings": settings}
    path.write_text(json.dumps(result, indent=1))
    return result


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def training_curves(root: Path, methods, steps_per_epoch: int) -> dict:
    """Per run: the dummy-gradient norm per step and per epoch (mean over its steps), the
    evaluation rows per epoch, and the final metrics."""
    curves = {}
    for method in methods:
        workdir = root / method
        train_rows = _read_jsonl(workdir / "train.jsonl")
        eval_rows = _read_jsonl(workdir / "eval.jsonl")
        penalty = [(r["step"], r["dgr/penalty"]) for r in train_rows if "dgr/penalty" in r]
        by_epoch = {}
        for step, value in penalty:
            by_epoch.setdefault((step - 1) // steps_per_epoch + 1, []).append(value)
        summary_path = workdir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        curves[method] = {
            "penalty": penalty,
            "penalty_by_epoch": {e: statistics.fmean(v) for e, v in sorted(by_epoch.items())},
            "eval": eval_rows,
            "metrics": summary.get("metrics", {}),
            "metrics_paper": summary.get("metrics_paper", {}),
        }
    return curves


# ---------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fidelity(path: Path, fidelity: dict) -> None:
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"float64": "-", "float32": "--"}
    for n, (epoch, result) in enumerate(sorted(fidelity.items())):
        colour = colours[n % len(colours)]
        for precision, rows in result["finite_difference"].items():
            eps = [float(e) for e in rows]
            state = "init" if epoch == 0 else f"epoch {epoch} (step {result['step']})"
            label = f"{state}, {precision}"
            left.loglog(
                eps,
                [rows[e]["rel_err"] for e in rows],
                styles[precision],
                color=colour,
                marker="o",
                label=label,
            )
            right.semilogx(
                eps,
                [rows[e]["cosine"] for e in rows],
                styles[precision],
                color=colour,
                marker="o",
                label=label,
            )
    for axis in (left, right):
        axis.set_xlabel("finite-difference step eps")
        axis.invert_xaxis()
    left.set_ylabel("relative error vs exact (float64)")
    right.set_ylabel("cosine to exact (float64)")
    right.axhline(1.0, color="grey", lw=0.6)
    left.set_title("FD penalty gradient w.r.t. the features: error")
    right.set_title("... and direction")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_cost(path: Path, cost: dict) -> None:
    plt = _pyplot()
    modes = cost["modes"]
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    names = list(modes)
    values = [modes[m]["median_s"] for m in names]
    bars = axis.bar(names, values, color="tab:blue")
    for bar, name in zip(bars, names):
        axis.annotate(
            f"{modes[name]['vs_vanilla']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.set_ylabel("seconds per train step (median)")
    axis.set_title("train step cost (label: x vanilla)")
    axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_training(path: Path, curves: dict, tasks, steps_per_epoch: int) -> None:
    plt = _pyplot()
    panels = 2 + len(tasks)
    figure, axes = plt.subplots(1, panels, figsize=(4.0 * panels, 3.8))
    for method, curve in curves.items():
        if curve["penalty"]:
            (line,) = axes[0].plot(*zip(*curve["penalty"]), lw=0.6, alpha=0.35)
            epochs = curve["penalty_by_epoch"]  # each epoch's mean, at its last step
            axes[0].plot(
                [e * steps_per_epoch for e in epochs],
                list(epochs.values()),
                marker="o",
                color=line.get_color(),
                label=method,
            )
        rows = curve["eval"]
        for axis, key in zip(axes[1:], [t.headline_key for t in tasks] + ["delta_m"]):
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("dummy-gradient norm (dgr/penalty)")
    axes[0].legend(fontsize=8)
    for axis, key in zip(axes[1:], [t.headline_key for t in tasks] + ["delta_m"]):
        axis.set_xlabel("epoch")
        axis.set_title(f"eval {key}")
        values = [
            v
            for curve in curves.values()
            for r in curve["eval"]
            for k, v in r.items()
            if k == key and math.isfinite(v)
        ]
        # early evaluations (running BatchNorm statistics of a few steps) can be far off
        if values and min(values) > 0 and max(values) > 20 * min(values):
            axis.set_yscale("log")
        elif values and max(map(abs, values)) > 20 * max(min(map(abs, values)), 1e-3):
            axis.set_yscale("symlog", linthresh=max(min(map(abs, values)), 1e-3))
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------
# The report


def _eps_text(eps: str) -> str:
    return f"{float(eps):.0e}".replace("e-0", "e-")


def fidelity_section(fidelity: dict, setup: RunSetup) -> list[str]:
    if not fidelity:
        return ["No fidelity point was measured."]
    config = setup.config
    first = next(iter(fidelity.values()))
    reference = first["reference"]
    lines = [
        "What is compared: the gradient of the penalty P (mean over the "
        f"K = {config.dgr.num_dummy} dummy sets of ‖∇_φ L_d‖{'²' if config.dgr.squared else ''}) "
        "with respect to the encoder's **features**, through the run's DeepLabV3 heads "
        f"(width {config.model.head_width}) in BatchNorm training mode, on the first training batch "
        f"({setup.batch['image'].shape[0]} images of {setup.image_size[0]}x{setup.image_size[1]}): "
        "`dgr_penalty`'s finite difference at each ε against its exact gradient in "
        f"{reference} (same inputs for both precisions: the float32 features, cast). "
        "The states are the exact run's: its initialisation and its checkpoints at the "
        "ends of the epochs listed.",
        "",
    ]
    for precision in first["finite_difference"]:
        eps_list = list(first["finite_difference"][precision])
        lines += [
            f"**{precision}**: cosine / relative error of the finite difference "
            f"(last column: the exact gradient computed in {precision})",
            "",
            "| state | P | "
            + " | ".join(f"ε = {_eps_text(e)}" for e in eps_list)
            + f" | exact, {precision} |",
            "|---" * (len(eps_list) + 3) + "|",
        ]
        for epoch, result in sorted(fidelity.items()):
            rows = result["finite_difference"][precision]
            exact = result["exact"][precision]
            name = "init" if epoch == 0 else f"epoch {epoch} (step {result['step']})"
            lines.append(
                f"| {name} | {result['penalty']:.4g} | "
                + " | ".join(
                    f"{rows[e]['cosine']:.3f} / {rows[e]['rel_err']:.2g}" for e in eps_list
                )
                + f" | {exact['cosine']:.6f} / {exact['rel_err']:.1e} |"
            )
        lines.append("")

    # In words, from the numbers.
    words = []
    last_epoch = max(fidelity)
    last = fidelity[last_epoch]
    for precision in first["finite_difference"]:
        parts = []
        for epoch, result in sorted(fidelity.items()):
            rows = result["finite_difference"][precision]
            best = max(rows, key=lambda e: rows[e]["cosine"])
            when = "at initialisation" if epoch == 0 else f"after {result['step']} steps"
            parts.append(
                f"{_eps_text(best)} {when} (cosine {rows[best]['cosine']:.3f}, relative error "
                f"{rows[best]['rel_err']:.2g})"
            )
        words.append(f"In {precision} the ε closest in direction is " + "; ".join(parts) + ".")
    step_of_run = config.dgr.fd_eps
    float32 = last["finite_difference"].get("float32", {})
    key = next((e for e in float32 if float(e) == step_of_run), None)
    if key is not None:
        init = fidelity.get(0)
        start = (
            f"{init['finite_difference']['float32'][key]['cosine']:.3f} at initialisation and "
            if init is not None and last_epoch != 0
            else ""
        )
        words.append(
            f"At ε = {_eps_text(key)} in float32 (the finite-difference run's step, --fd_eps) the "
            f"cosine to the exact gradient is {start}{float32[key]['cosine']:.3f} after "
            f"{last['step']} steps, with relative error {float32[key]['rel_err']:.2g}."
        )
    if "float32" in last["exact"] and reference == "float64":
        words.append(
            f"The exact gradient computed in float32 is "
            f"{max(r['exact']['float32']['rel_err'] for r in fidelity.values()):.1e} "
            "(relative, worst state) from the float64 one: float32 rounding alone."
        )
    return lines + [" ".join(words), "", "![fidelity](fidelity.png)"]


def cost_section(cost: dict) -> list[str]:
    modes = cost["modes"]
    settings = cost["settings"]
    lines = [
        f"Train step of the run's network ({settings['model']['network']} "
        f"{settings['model']['backbone']}, base width {settings['model']['base_width']}, heads "
        f"{settings['model']['head_width']}), batch {settings['batch_size']} of "
        f"{settings['height']}x{settings['width']}, K = {settings['num_dummy']}; median of "
        f"{settings['repeats']} steps after a warm-up, on {settings['device']}.",
        "",
        "| --dgr_method | s / step | × vanilla | × exact | compile s |",
        "|---|---|---|---|---|",
    ]
    for mode, f in modes.items():
        vs_exact = f"{f['vs_exact']:.2f}" if "vs_exact" in f else "-"
        lines.append(
            f"| {mode} | {f['median_s']:.3f} | {f['vs_vanilla']:.2f} | {vs_exact} | "
            f"{f['compile_s']:.1f} |"
        )
    words = []
    if "exact" in modes:
        words.append(
            f"DGR with the exact gradient costs {modes['exact']['vs_vanilla']:.2f}× the vanilla "
            "step."
        )
        described = {
            "finite_difference": "The feature-level finite difference's step costs",
            "paper": "The paper's algorithm (the whole model again per dummy set) costs",
            "double_backprop": "Double backprop costs",
        }
        for mode, text in described.items():
            if mode in modes:
                words.append(f"{text} {modes[mode]['vs_exact']:.2f}× exact's.")
    return lines + ["", " ".join(words), "", "![cost](cost.png)"]


def training_section(curves: dict, tasks, cost: dict, synthetic: bool) -> list[str]:
    keys = [t.headline_key for t in tasks]
    lines = [
        "Every run starts from the same initialisation and sees the same batches (same "
        "seed); only `--dgr_method` differs. Final metrics (whole-set statistics) and the "
        "dummy-gradient norm P (mean over the last epoch's steps):",
        "",
        "| --dgr_method | "
        + " | ".join(keys)
        + " | Δm | Δm (paper's convention) | P, last epoch |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for method, curve in curves.items():
        m, p = curve["metrics"], curve["metrics_paper"]
        epochs = curve["penalty_by_epoch"]
        final_p = epochs[max(epochs)] if epochs else math.nan
        lines.append(
            f"| {method} | "
            + " | ".join(f"{m[k]:.4f}" if k in m else "-" for k in keys)
            + f" | {100 * m.get('delta_m', math.nan):+.2f}% | "
            f"{100 * p.get('delta_m', math.nan):+.2f}% | {final_p:.4g} |"
        )
    words = []
    finals = {
        method: (
            c["penalty_by_epoch"][min(c["penalty_by_epoch"])],
            c["penalty_by_epoch"][max(c["penalty_by_epoch"])],
        )
        for method, c in curves.items()
        if c["penalty_by_epoch"]
    }
    if finals:
        epochs = max(max(c["penalty_by_epoch"]) for c in curves.values() if c["penalty_by_epoch"])
        if epochs > 1:
            words.append(
                f"Over {epochs} epochs the dummy-gradient norm (epoch means) goes "
                + "; ".join(f"from {a:.4g} to {b:.4g} with {m}" for m, (a, b) in finals.items())
                + "."
            )
        lowest = min(finals, key=lambda m: finals[m][1])
        words.append(f"The lowest norm in the last epoch is {lowest}'s.")
    scored = {m: c["metrics"]["delta_m"] for m, c in curves.items() if "delta_m" in c["metrics"]}
    if scored:
        best = max(scored, key=scored.get)
        words.append(
            "Final Δm: "
            + ", ".join(f"{m} {100 * v:+.2f}%" for m, v in scored.items())
            + f"; the best is {best}'s."
        )
    if "exact" in scored and len(scored) > 1:
        words.append(
            "Differences from exact: "
            + ", ".join(
                f"{m} {100 * (v - scored['exact']):+.2f} points"
                for m, v in scored.items()
                if m != "exact"
            )
            + " (one seed: compare with the spread over seeds before reading much into it)."
        )
    timed = [m for m in curves if m != "exact" and "vs_exact" in cost["modes"].get(m, {})]
    if timed:
        words.append(
            "Per step, "
            + ", ".join(f"{m} costs {cost['modes'][m]['vs_exact']:.2f}× exact" for m in timed)
            + " (section 2)."
        )
    if synthetic:
        words.append(
            "On built-in data Δm is against the paper's single-task results on real NYUv2, so "
            "only the differences between rows mean something (--reference with your own "
            "single-task runs' summary.json for a meaningful Δm)."
        )
    return lines + ["", " ".join(words), "", "![training](training.png)"]


def markdown(setup: RunSetup, fidelity: dict, cost: dict, curves: dict) -> str:
    config = setup.config
    from experiments import _bench

    lines = [
        "# DGR ablation: exact vs finite difference vs double backprop",
        "",
        f"NYUv2 ({setup.data_description}), {config.model.network} {config.model.backbone} "
        f"(base width {config.model.base_width}, stages {config.model.stage_sizes or 'real'}, "
        f"heads {config.model.head_width}), batch {config.train.batch_size}, "
        f"{config.train.epochs} epoch(s) of {setup.steps_per_epoch} step(s), λ = {config.dgr.weight}, "
        f"K = {config.dgr.num_dummy}, {'‖g‖²' if config.dgr.squared else '‖g‖'}, FD runs with "
        f"ε = {config.dgr.fd_eps:g}, seed {config.train.seed}; {_bench.device_description()}.",
        "",
        "## 1. Fidelity of the finite difference",
        "",
        *fidelity_section(fidelity, setup),
        "",
        "## 2. Cost per train step",
        "",
        *cost_section(cost),
        "",
        "## 3. Training",
        "",
        *training_section(
            curves, setup.tasks, cost, config.data.synthetic and config.reference is None
        ),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    args, configs = parse_args(argv)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    root = Path(args.workdir).expanduser()
    if root.exists() and not root.is_dir():
        raise SystemExit(f"{PROG}: --workdir {root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(root)
    start = time.perf_counter()
    config = configs["exact"]
    setup = RunSetup(config, PROG)
    say(
        f"ablation in {root}: training runs {', '.join(args.methods)}; fidelity at epochs "
        f"{', '.join(map(str, args.fidelity_epochs))} of the exact run; "
        f"{setup.steps_per_epoch} steps/epoch, {setup.total_steps} steps per run"
    )

    fidelity = run_fidelity(args, setup, root)
    train_or_skip(
        config, root / "exact", "[training] exact", total_steps=setup.total_steps, prog=PROG
    )
    for method in args.methods:
        if method != "exact":
            label = f"[training] {method}"
            train_or_skip(
                configs[method], root / method, label, total_steps=setup.total_steps, prog=PROG
            )
    cost = run_cost(args, setup, root)
    curves = training_curves(root, args.methods, setup.steps_per_epoch)

    plot_fidelity(root / "fidelity.png", fidelity)
    plot_cost(root / "cost.png", cost)
    plot_training(root / "training.png", curves, setup.tasks, setup.steps_per_epoch)
    text = markdown(setup, fidelity, cost, curves)
    (root / "ablation.md").write_text(text)
    result = {
        "config": config.as_dict(),
        "methods": args.methods,
        "fidelity": {
            str(e): {k: v for k, v in r.items() if k != "settings"} for e, r in fidelity.items()
        },
        "cost": cost,
        "training": {
            m: {
                "metrics": c["metrics"],
                "metrics_paper": c["metrics_paper"],
                "penalty_by_epoch": {str(e): v for e, v in c["penalty_by_epoch"].items()},
                "eval": c["eval"],
            }
            for m, c in curves.items()
        },
    }
    (root / "ablation.json").write_text(json.dumps(result, indent=1))
    say(
        f"wrote {root / 'ablation.md'}, {root / 'ablation.json'}, fidelity.png, cost.png, "
        f"training.png ({time.perf_counter() - start:.0f} s)"
    )
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
