"""Universality of a trained encoder's features (the paper's Definition 2), per task.

    python -m experiments.universality                      # built-in NYUv2 scenes, CPU sizes: minutes
    python -m experiments.universality --runs runs/vanilla runs/dgr
    python -m experiments.universality --data_dir ~/data/nyuv2 --epochs 200 --pretrained resnet50.safetensors

Definition 2 calls features z universal for task t when a head fresh from the
initialiser does nearly as well on them as the best head of the same architecture:
the gap U_t = E_phi[l_t(h_phi(z))] - min_psi l_t(h_psi(z)) is small. DGR penalises
the dummy-gradient norm ||grad_phi l_t|| at random heads, which bounds the gap where the
loss is gradient-dominated (U_t <= ||grad||^2 / (2 mu)). This command measures all three
on the frozen features of each run, per task, vanilla beside DGR:

* z: the run's frozen encoder on a fixed set, the first --train_examples examples of
  the run's first training epoch (its seed, its augmentation), and on the first
  --eval_examples of its evaluation split. --encoder_mode train (the default): the
  encoder as the train step runs it, BatchNorm on the statistics of each batch (the
  examples in consecutive chunks of the run's --batch_size, in order; BatchNorm's updates
  discarded), the features on which DGR penalised the norm; inference: running BatchNorm
  statistics, as the evaluation step runs it; both: each, the default's in the tables and
  the other's beside them. Every loss is the task's training loss (dgr_jax.tasks) over the
  whole set, the heads' BatchNorm on that set's statistics, as DGR's dummy heads run.
* (a) fitted: min_psi l_t on each set, approximated by full-batch Adam (--fit_lr) from
  the run's own trained heads, checked every --fit_check steps and stopped when each
  task's loss fell by less than --fit_tol (relative) since the last check, or after
  --fit_steps; the gradient norm at the fitted head shows how close to a minimum it got.
  Each set is fitted apart (a head fitted on the training set overfits it and is no
  minimum on the evaluation set). All tasks' heads are fitted at once: their parameters
  are disjoint and Adam's update is per parameter, so each follows its own path.
* (b) random: K = --num_heads head sets fresh from the run's initialiser
  (dgr_jax.init_dummy_sets, the dummy sets' own), never trained; --draws independent
  draws of K. Per draw the mean over its K heads; reported: the mean over draws and their
  standard deviation, the sampling error of a K-head estimate (the draws' mean has
  std / sqrt(draws)). The same draws are used for every run (same keys), so runs differ
  only by their features. The run's own dummy sets are shown beside them.
* (c) the dummy-gradient norm ||grad_phi l_t|| at those random heads (dgr_jax.dgr_penalty
  of l_t alone, exact), and ||grad_phi sum_t l_t||, the quantity DGR penalises.

Writes universality.md (definitions, the table, what it shows), universality.json and
universality.png into --workdir. Without --runs it trains a vanilla run (--dgr_weight 0)
and a DGR run from the same seed into <workdir>/vanilla and <workdir>/dgr (a rerun skips
them); without --data_dir on built-in data with the entry points' CPU preset plus
--epochs 3 --synthetic_counts 32,16 (data sets without generated data: the CPU-sized
network, 1 epoch). Every flag it does not know goes to both runs: --epochs, --backbone,
--num_dummy, --weighting, --seed, ... (python -m experiments.<dataset> --help).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path

from experiments.runs import (
    FrozenFeatures,
    analysis_workdir,
    comparison_configs,
    comparison_parser,
    comparison_runs,
    pyplot,
    say,
)

PROG = "python -m experiments.universality"
# Built-in data: the entry points' CPU preset (--synthetic) with a shorter schedule and
# fewer examples, so that both runs and the measurement take minutes on a CPU.
PRESET = ["--epochs", "3", "--synthetic_counts", "32,16"]
# Data sets without generated data (multidigits) get the CPU-sized network instead.
SMALL_NETWORK = ["--backbone", "resnet18", "--base_width", "16", "--stage_sizes", "1,2,1,1"]
# FrozenFeatures' modes, the default first: the train step's (DGR penalises the norm there).
ENCODER_MODES = ("train", "inference")


def builtin_flags(dataset: str) -> list[str]:
    from experiments.datasets import DATASETS

    spec = DATASETS[dataset]
    if spec.has_synthetic:
        return ["--synthetic", *PRESET]
    return [*SMALL_NETWORK, "--epochs", "1"]


def make_parser() -> argparse.ArgumentParser:
    from experiments.datasets import DATASETS

    parser = comparison_parser(PROG, __doc__, "runs/universality")
    add = parser.add_argument
    add(
        "--dataset",
        choices=sorted(DATASETS),
        default="nyuv2",
        help="the data set of the runs it trains (default nyuv2); every other flag of "
        "python -m experiments.<dataset> goes to both runs",
    )
    add(
        "--train_examples",
        type=int,
        default=32,
        help="examples of the fixed training set (the first of epoch 0; default 32)",
    )
    add(
        "--eval_examples",
        type=int,
        default=16,
        help="examples of the evaluation split (the first; default 16)",
    )
    add(
        "--encoder_mode",
        choices=(*ENCODER_MODES, "both"),
        default=ENCODER_MODES[0],
        help="how the frozen encoder computes the features: train (default) with BatchNorm "
        "on each batch's statistics (chunks of the run's --batch_size, in order; updates "
        "discarded), as the train step and DGR's penalty see them; inference with the running "
        "statistics, as evaluation does; both: each, the default's first",
    )
    add("--num_heads", type=int, default=3, help="K, random head sets per draw (default 3)")
    add("--draws", type=int, default=5, help="independent draws of K random heads (default 5)")
    add("--head_seed", type=int, default=0, help="seed of the random heads (default 0)")
    add("--fit_steps", type=int, default=200, help="most Adam steps of the fit (default 200)")
    add("--fit_lr", type=float, default=1e-2, help="Adam's learning rate of the fit (default 1e-2)")
    add(
        "--fit_check",
        type=int,
        default=25,
        help="steps between convergence checks of the fit (default 25)",
    )
    add(
        "--fit_tol",
        type=float,
        default=1e-3,
        help="converged: the loss fell by less than this fraction since the last check "
        "(default 1e-3)",
    )
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args, passed = parser.parse_known_args(argv)
    for name in ("train_examples", "eval_examples", "num_heads", "draws", "fit_steps", "fit_check"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.draws < 2:
        parser.error(f"--draws must be >= 2 (their spread is the sampling error), got {args.draws}")
    for name in ("fit_lr", "fit_tol"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    configs = comparison_configs(parser, args, passed, args.dataset, builtin_flags(args.dataset))
    return args, configs


# ---------------------------------------------------------------------------
# The estimators


def task_loss_fns(apply_heads, tasks) -> dict:
    """``{task: l_t(params, features, targets)}``: task t's loss of the heads ``params``
    on ``features``; it depends on task t's subtree of ``params`` only."""
    from dgr_jax.tasks import task_losses

    losses = task_losses(tasks)

    def loss_of(name):
        return lambda params, features, targets: losses[name](
            apply_heads(params, features)[name], targets[name]
        )

    return {t.name: loss_of(t.name) for t in tasks}


def make_measure(apply_heads, tasks):
    """A jitted ``measure(params, features, targets) -> {task: (loss, grad_norm)}`` with
    ``"all"``: ``(sum of the losses, ||grad_phi sum_t l_t||)``, DGR's dummy loss and
    penalty of one head set. Norms are ``dgr_penalty`` (exact) of each loss."""
    import jax

    from dgr_jax import dgr_penalty, multitask_dummy_loss
    from dgr_jax.tasks import task_losses

    loss_fns = task_loss_fns(apply_heads, tasks)
    dummy_loss = multitask_dummy_loss(apply_heads, task_losses(tasks))

    def measure(params, features, targets):
        result = {
            name: (fn(params, features, targets), dgr_penalty(fn, params, features, targets))
            for name, fn in loss_fns.items()
        }
        result["all"] = (
            dummy_loss(params, features, targets),
            dgr_penalty(dummy_loss, params, features, targets),
        )
        return result

    return jax.jit(measure)


def fit_heads(apply_heads, tasks, params, features, targets, *, lr, max_steps, check_every, tol):
    """``(params, fit)``: heads fitted by Adam on the whole set (``features``,
    ``targets``) to convergence, from ``params``. ``fit[task]``: ``{"steps", "converged",
    "losses"}``, the losses at every check (step 0 first) and the step of the first check
    whose loss fell by less than ``tol`` (relative) since the one before, or ``max_steps``
    unconverged. All tasks train at once until each converged: their parameters are
    disjoint and Adam is per parameter, so each follows its own path."""
    import jax
    import jax.numpy as jnp
    import optax

    loss_fns = task_loss_fns(apply_heads, tasks)
    names = list(loss_fns)
    optimizer = optax.adam(lr)

    # The set is an argument, not a constant of the program: XLA would fold it in.
    def per_task(p, features, targets):
        return jnp.stack([loss_fns[n](p, features, targets) for n in names])

    # One jitted step called from Python: on XLA:CPU it ran 4-7x faster than the same
    # steps in a fori_loop.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, features, targets):
        grads = jax.grad(lambda q: jnp.sum(per_task(q, features, targets)))(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    losses_of = jax.jit(per_task)
    features, targets = jax.device_put((features, targets))  # once, not every step
    opt_state = optimizer.init(params)
    params = jax.tree_util.tree_map(jnp.array, params)  # a copy: the steps donate it
    history = [[float(v) for v in jax.device_get(losses_of(params, features, targets))]]
    converged_at = {n: None for n in names}
    done = 0
    while done < max_steps and any(v is None for v in converged_at.values()):
        chunk = min(check_every, max_steps - done)
        for _ in range(chunk):
            params, opt_state = step(params, opt_state, features, targets)
        done += chunk
        losses = losses_of(params, features, targets)
        history.append([float(v) for v in jax.device_get(losses)])
        if not all(math.isfinite(v) for v in history[-1]):
            raise FloatingPointError(f"the fit's loss is not finite at step {done}")
        for i, name in enumerate(names):
            before, now = history[-2][i], history[-1][i]
            if converged_at[name] is None and before - now <= tol * abs(before):
                converged_at[name] = done
    fit = {
        name: {
            "steps": converged_at[name] or done,
            "converged": converged_at[name] is not None,
            "losses": [row[i] for row in history],
        }
        for i, name in enumerate(names)
    }
    return params, fit


def _mean_std(values) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def random_head_statistics(measure, head_draws, features, targets, fitted: dict) -> dict:
    """Per task (and ``"all"``), over the draws of K head sets (``head_draws``: a list of
    stacked head sets): each draw's mean over its K sets of the loss, of the gap to the
    ``fitted`` loss and of the gradient norm; then their mean and std over draws."""
    import jax

    per_draw = {}
    for stacked in head_draws:
        num_sets = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        rows = {}
        for k in range(num_sets):
            head = jax.tree_util.tree_map(lambda leaf, k=k: leaf[k], stacked)
            for name, (loss, norm) in jax.device_get(measure(head, features, targets)).items():
                rows.setdefault(name, []).append((float(loss), float(norm)))
        for name, values in rows.items():
            loss = statistics.fmean(v[0] for v in values)
            norm = statistics.fmean(v[1] for v in values)
            per_draw.setdefault(name, []).append({"loss": loss, "grad_norm": norm})
    result = {}
    for name, draws in per_draw.items():
        loss_mean, loss_std = _mean_std([d["loss"] for d in draws])
        norm_mean, norm_std = _mean_std([d["grad_norm"] for d in draws])
        gaps = [d["loss"] - fitted[name] for d in draws]
        gap_mean, gap_std = _mean_std(gaps)
        result[name] = {
            "loss_mean": loss_mean,
            "loss_std": loss_std,
            "gap_mean": gap_mean,
            "gap_std": gap_std,
            "grad_norm_mean": norm_mean,
            "grad_norm_std": norm_std,
            "per_draw": draws,
        }
    return result


def head_draws(net, key, draws: int, num_heads: int, sample_features, image_size) -> list:
    """``draws`` independent stacks of ``num_heads`` head sets from the heads' initialiser
    (as the run's dummy sets are made: ``dgr_jax.init_dummy_sets``)."""
    import jax

    from dgr_jax import init_dummy_sets

    return [
        init_dummy_sets(net.heads, k, num_heads, sample_features, tuple(image_size), train=False)
        for k in jax.random.split(key, draws)
    ]


def _sets_of(stacked) -> int:
    import jax

    return jax.tree_util.tree_leaves(stacked)[0].shape[0]


def encoder_modes(choice: str) -> list[str]:
    """The modes --encoder_mode asks for, the one the tables show first."""
    return list(ENCODER_MODES) if choice == "both" else [choice]


def measure_run(run, args, mode: str) -> dict:
    """Every number of one run, its encoder in ``mode`` (``FrozenFeatures``): fitted,
    random and own-dummy heads on both splits."""
    import jax

    from dgr_jax.models import heads_apply_fn

    setup, tasks = run.setup, run.setup.tasks
    names = [t.name for t in tasks]
    # The run's batch size in both modes, so that the chunks are the same.
    frozen = FrozenFeatures(setup.net, mode, batch_size=run.config.train.batch_size)
    train = frozen.collect(
        run.state, setup.data.train_epoch(0, 0), names, max_examples=args.train_examples
    )
    evaluation = frozen.collect(
        run.state, setup.data.evaluation(), names, max_examples=args.eval_examples
    )
    apply_heads = heads_apply_fn(setup.net.heads, setup.image_size)
    measure = make_measure(apply_heads, tasks)
    sample = jax.tree_util.tree_map(lambda leaf: leaf[:2], train[0])
    draws = head_draws(
        setup.net,
        jax.random.PRNGKey(args.head_seed),
        args.draws,
        args.num_heads,
        sample,
        setup.image_size,
    )
    result = {
        "label": run.label,
        "encoder_mode": mode,
        "batch_size": run.config.train.batch_size,
        "workdir": str(run.workdir),
        "dgr": run.dgr_text,
        "config": run.config.as_dict(),
        "steps": run.summary.get("steps"),
        "examples": {"train": len(train[1][names[0]]), "eval": len(evaluation[1][names[0]])},
        "fit": {},
        "splits": {},
    }
    for split, (features, targets) in (("train", train), ("eval", evaluation)):
        say(
            f"[{run.label}, {mode} mode] {split}: fitting heads on the frozen features of "
            f"{len(targets[names[0]])} examples (at most {args.fit_steps} Adam steps) ..."
        )
        start = time.perf_counter()
        fitted_params, fit = fit_heads(
            apply_heads,
            tasks,
            run.state.params["heads"],
            features,
            targets,
            lr=args.fit_lr,
            max_steps=args.fit_steps,
            check_every=args.fit_check,
            tol=args.fit_tol,
        )
        say(
            f"[{run.label}, {mode} mode] {split}: fitted in {time.perf_counter() - start:.0f} s: "
            + ", ".join(
                f"{n} {f['losses'][0]:.4g} -> {f['losses'][-1]:.4g} "
                f"({'converged' if f['converged'] else 'not converged'} at step {f['steps']})"
                for n, f in fit.items()
            )
        )
        fitted = {
            name: (float(loss), float(norm))
            for name, (loss, norm) in jax.device_get(
                measure(fitted_params, features, targets)
            ).items()
        }
        trained = jax.device_get(measure(run.state.params["heads"], features, targets))
        fitted_loss = {name: v[0] for name, v in fitted.items()}
        random = random_head_statistics(measure, draws, features, targets, fitted_loss)
        own = random_head_statistics(
            measure, [run.state.dummy_sets], features, targets, fitted_loss
        )
        rows = {}
        for name in names + ["all"]:
            rows[name] = {
                "fitted_loss": fitted[name][0],
                "fitted_grad_norm": fitted[name][1],
                "trained_head_loss": float(trained[name][0]),
                **random[name],
                "own_dummy_loss": own[name]["loss_mean"],
                "own_dummy_grad_norm": own[name]["grad_norm_mean"],
                "own_dummy_sets": _sets_of(run.state.dummy_sets),
            }
        result["fit"][split] = fit
        result["splits"][split] = rows
        say(
            f"[{run.label}, {mode} mode] {split}: "
            + ", ".join(
                f"{n} gap {r['gap_mean']:.4g}±{r['gap_std']:.2g}, "
                f"||grad|| {r['grad_norm_mean']:.4g}±{r['grad_norm_std']:.2g}"
                for n, r in rows.items()
            )
        )
    return result


# ---------------------------------------------------------------------------
# Report


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}"


def table(results: list[dict], split: str, names: list[str]) -> list[str]:
    lines = [
        "| task | run | fitted l_t | run's head l_t | random l_t | gap U_t | ‖∇φ l_t‖ random "
        "| ‖∇ψ l_t‖ fitted | ‖∇φ l_t‖ own dummy sets |",
        "|---" * 9 + "|",
    ]
    for name in names + ["all"]:
        for result in results:
            r = result["splits"][split][name]
            lines.append(
                f"| {'Σ_t (DGR)' if name == 'all' else name} | {result['label']} "
                f"| {r['fitted_loss']:.4g} | {r['trained_head_loss']:.4g} "
                f"| {_pm(r['loss_mean'], r['loss_std'])} | {_pm(r['gap_mean'], r['gap_std'])} "
                f"| {_pm(r['grad_norm_mean'], r['grad_norm_std'])} | {r['fitted_grad_norm']:.3g} "
                f"| {r['own_dummy_grad_norm']:.4g} (K={r['own_dummy_sets']}) |"
            )
    return lines


def _compare(results: list[dict], split: str, name: str, key: str) -> str:
    """``"a 1.2 ± 0.1 vs b 0.9 ± 0.1 (...)"``; for two runs, their difference draw by draw
    (every run sees the same draws of random heads, so the difference is paired) against
    its standard error over the draws."""
    rows = [r["splits"][split][name] for r in results]
    text = " vs ".join(
        f"{r['label']} {_pm(row[key + '_mean'], row[key + '_std'])}"
        for r, row in zip(results, rows)
    )
    if len(rows) == 2:
        (a, b), offset = (row["per_draw"] for row in rows), 0.0
        field = "loss" if key == "gap" else key
        if key == "gap":  # gap = random loss - fitted loss, the fitted one per run
            offset = rows[1]["fitted_loss"] - rows[0]["fitted_loss"]
        diffs = [y[field] - x[field] - offset for x, y in zip(a, b)]
        mean, std = _mean_std(diffs)
        error = std / math.sqrt(len(diffs))
        verdict = "beyond" if abs(mean) > 2 * error else "within"
        text += (
            f" (paired difference {mean:+.3g} ± {error:.2g} standard error: {verdict} twice the "
            "sampling error)"
        )
    return text


def words(results: list[dict], names: list[str], args) -> list[str]:
    text = []
    for split, where in (("train", "the fixed training set"), ("eval", "the evaluation set")):
        sentences = []
        for name in names:
            sentences.append(
                f"{name}: gap {_compare(results, split, name, 'gap')}; random-head gradient norm "
                f"{_compare(results, split, name, 'grad_norm')}."
            )
        text.append(f"On {where}: " + " ".join(sentences))
    if len(results) == 2:
        a, b = results
        lower_norm = [
            n
            for n in names
            if b["splits"]["eval"][n]["grad_norm_mean"] < a["splits"]["eval"][n]["grad_norm_mean"]
        ]
        lower_gap = [
            n
            for n in names
            if b["splits"]["eval"][n]["gap_mean"] < a["splits"]["eval"][n]["gap_mean"]
        ]
        text.append(
            f"On the evaluation set, {b['label']}'s features give random heads a lower gradient "
            f"norm than {a['label']}'s on {len(lower_norm)} of {len(names)} tasks"
            f"{' (' + ', '.join(lower_norm) + ')' if lower_norm else ''} and a smaller gap to a "
            f"fitted head on {len(lower_gap)} of {len(names)}"
            f"{' (' + ', '.join(lower_gap) + ')' if lower_gap else ''}."
        )
    unconverged = [
        f"{r['label']}/{split}/{n}"
        for r in results
        for split, fits in r["fit"].items()
        for n, f in fits.items()
        if not f["converged"]
    ]
    text.append(
        "Every fit converged by the check above."
        if not unconverged
        else f"Not converged within {args.fit_steps} steps: {', '.join(unconverged)}; their "
        "fitted loss is an upper bound of the minimum, so their gap is underestimated "
        "(raise --fit_steps)."
    )
    return text


# How each FrozenFeatures mode computes z, in the report's words.
MODE_WORDS = {
    "train": "training mode, as the train step runs it (BatchNorm on the statistics of each "
    "batch, its updates discarded: the features on which DGR penalised the norm)",
    "inference": "inference mode, as the evaluation step runs it (running BatchNorm statistics)",
}


def mode_paragraph(by_mode: dict, names: list[str]) -> list[str]:
    """Which encoder mode the tables use and, when the other was measured too, what it
    gives on the evaluation set."""
    modes = list(by_mode)
    sizes = ", ".join(f"{r['label']} {r['batch_size']}" for r in by_mode[modes[0]])
    text = [
        f"The tables above use the encoder in {MODE_WORDS[modes[0]]}. In training mode an "
        "example's features depend on its batch: the fixed sets go through the encoder in "
        f"consecutive chunks of the run's batch size ({sizes}), in their order, in either mode."
        + ("" if len(modes) > 1 else " The other mode was not measured (--encoder_mode both).")
    ]
    for mode in modes[1:]:
        results = by_mode[mode]
        sentences = [
            f"{'Σ_t' if name == 'all' else name}: gap {_compare(results, 'eval', name, 'gap')}; "
            "random-head gradient norm "
            f"{_compare(results, 'eval', name, 'grad_norm')}."
            for name in names + ["all"]
        ]
        text.append(
            f"With the encoder in {MODE_WORDS[mode]} instead, on the evaluation set "
            "(Σ_t: the summed loss, the one DGR penalises): "
            + " ".join(sentences)
            + f" Its tables: '{mode} "
            "mode' below."
        )
    return text


def markdown(by_mode: dict, names: list[str], args) -> str:
    """The report: ``by_mode`` holds each measured mode's results, the tables' mode first."""
    modes = list(by_mode)
    results = by_mode[modes[0]]
    first = results[0]
    lines = [
        "# Universality of the shared features (Definition 2)",
        "",
        "Runs: "
        + "; ".join(
            f"**{r['label']}** ({r['dgr']}, {r['config']['dataset']}, "
            f"{r['config']['model']['network']} {r['config']['model']['backbone']}, "
            f"{r['steps']} steps; {r['workdir']})"
            for r in results
        )
        + ".",
        "",
        "## Estimators",
        "",
        f"- Features z: each run's encoder in {modes[0]} mode on a fixed set, the first "
        f"{first['examples']['train']} examples of its first training epoch, and on the first "
        f"{first['examples']['eval']} of its evaluation split. l_t is task t's training loss over "
        "the whole set; heads run BatchNorm on that set's statistics, as DGR's dummy heads do.",
        f"- **fitted l_t** ≈ min_ψ l_t(h_ψ(z)) on that set: full-batch Adam (lr "
        f"{args.fit_lr:g}) from the run's trained heads, fitted on each set apart (a head fitted "
        "on the training set overfits it and is no minimum on the evaluation set), a "
        f"convergence check every {args.fit_check} steps (converged when the loss fell by "
        f"less than {args.fit_tol:g} of itself since the last check), at most "
        f"{args.fit_steps} steps. ‖∇ψ l_t‖ fitted is the gradient norm left at it (0 at an "
        "exact minimum). 'run's head l_t': the run's own trained heads, where the fit starts.",
        f"- **random l_t**: heads fresh from the initialiser of the run's dummy sets, never "
        f"trained: {args.draws} draws of K = {args.num_heads} head sets (seed {args.head_seed}, "
        "the same for every run); each draw's mean over its K sets, then mean ± std over the "
        f"draws. The std is the sampling error of a K-head estimate (the {args.draws}-draw "
        f"mean's is std/√{args.draws}).",
        "- **gap U_t** = random l_t − fitted l_t: small means universal (Definition 2).",
        "- **‖∇φ l_t‖ random**: the dummy-gradient norm at those heads (`dgr_penalty` of l_t "
        "alone, exact); Σ_t: ‖∇φ Σ_t l_t‖, what DGR penalises. 'own dummy sets': the run's "
        "own fixed dummy sets (those a DGR run trained against). A DGR run penalised these "
        "norms on training-mode features (batch statistics) of its training batches at its own "
        "dummy sets; here the encoder is frozen and the heads are fresh.",
        "",
    ]
    for split, title in (("train", "Fixed training set"), ("eval", "Evaluation set")):
        lines += [f"## {title}", "", *table(results, split, names), ""]
    lines += ["## What it shows", "", *[t + "\n" for t in words(results, names, args)]]
    lines += ["## Encoder mode", "", *[t + "\n" for t in mode_paragraph(by_mode, names)]]
    lines += ["![universality](universality.png)", ""]
    for mode in modes[1:]:
        for split, title in (("train", "fixed training set"), ("eval", "evaluation set")):
            lines += [f"## {mode} mode: {title}", "", *table(by_mode[mode], split, names), ""]
        lines += [*[t + "\n" for t in words(by_mode[mode], names, args)]]
    return "\n".join(lines)


def plot(path: Path, results: list[dict], names: list[str], mode: str) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.2), squeeze=False)
    width = 0.8 / len(results)
    for col, name in enumerate(names):
        for n, result in enumerate(results):
            x = [i + (n - (len(results) - 1) / 2) * width for i in range(2)]
            rows = [result["splits"][s][name] for s in ("train", "eval")]
            for row, key in enumerate(("gap", "grad_norm")):
                axes[row, col].bar(
                    x,
                    [r[f"{key}_mean"] for r in rows],
                    width,
                    yerr=[r[f"{key}_std"] for r in rows],
                    capsize=3,
                    label=result["label"],
                )
        for row, title in ((0, "gap U_t = random − fitted loss"), (1, "‖∇φ l_t‖ at random heads")):
            axis = axes[row, col]
            axis.set_xticks([0, 1], ["train (fixed set)", "eval"])
            axis.set_title(f"{name}: {title}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(
        f"Universality (encoder in {mode} mode): error bars are the std over draws of K "
        "random heads",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    args, configs = parse_args(argv)
    root = analysis_workdir(args.workdir, PROG)
    start = time.perf_counter()
    runs = comparison_runs(args, configs, root, PROG)
    names = [t.name for t in runs[0].setup.tasks]
    for run in runs[1:]:
        if [t.name for t in run.setup.tasks] != names:
            raise SystemExit(
                f"{PROG}: --runs: {run.label} has tasks "
                f"{', '.join(t.name for t in run.setup.tasks)}, {runs[0].label} {', '.join(names)}"
            )
    try:
        by_mode = {
            mode: [measure_run(run, args, mode) for run in runs]
            for mode in encoder_modes(args.encoder_mode)
        }
    except (ValueError, FloatingPointError) as error:
        raise SystemExit(f"{PROG}: {' '.join(str(error).split())}") from None
    settings = {
        k: getattr(args, k)
        for k in (
            "train_examples",
            "eval_examples",
            "num_heads",
            "draws",
            "head_seed",
            "fit_steps",
            "fit_lr",
            "fit_check",
            "fit_tol",
            "encoder_mode",
        )
    }
    settings["fit_optimizer"] = "adam"
    modes = list(by_mode)
    # "runs": the tables' mode (settings' encoder_mode, or the default's with both);
    # "other_modes": the rest, when measured.
    payload = {"settings": settings, "tasks": names, "runs": by_mode[modes[0]]}
    if len(modes) > 1:
        payload["other_modes"] = {mode: by_mode[mode] for mode in modes[1:]}
    plot(root / "universality.png", by_mode[modes[0]], names, modes[0])
    (root / "universality.json").write_text(json.dumps(payload, indent=1))
    (root / "universality.md").write_text(markdown(by_mode, names, args))
    say(f"wrote {root / 'universality.md'} ({time.perf_counter() - start:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
