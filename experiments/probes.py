"""Probes of a frozen encoder's features and their t-SNE (the paper's Fig. 3).

    python -m experiments.probes                              # built-in MultiDigits, CPU sizes: minutes
    python -m experiments.probes --data_dir ~/data/UTKFace    # UTKFace, the paper's recipe
    python -m experiments.probes --runs runs/vanilla runs/dgr runs/pcgrad

For each run: its encoder in inference mode (running BatchNorm statistics), its shared
features global-average-pooled (dense features: over the spatial axes; MTAN: each task's
own features), on the first --train_examples of the run's first training epoch and the
first --eval_examples of its evaluation split. Per classification task three
scikit-learn probes are fitted on the training features and scored (accuracy) on the
evaluation features: a decision tree (DecisionTreeClassifier, unlimited depth), a linear
SVM (LinearSVC on standardised features) and k nearest neighbours (KNeighborsClassifier,
k = --neighbors, on standardised features). The better a fixed, simple probe reads a
task off the features, the more of the task the representation holds in that form.
Tasks that are not per-example classes (segmentation, regression: depth, disparity;
normals) are skipped with a note; they have no per-image label to probe.

t-SNE (sklearn.manifold.TSNE, PCA initialisation) of the pooled evaluation features
(the first --tsne_examples), one embedding per run, a panel per task coloured by its
class (UTKFace's age bins in order on an ordered colour map).

Writes probes.md (the accuracy table and what it shows), probes.json, tsne_<run>.png
per run and tsne.png with the runs side by side into --workdir. Without --runs it trains
a vanilla run (--dgr_weight 0) and a DGR run from the same seed into <workdir>/vanilla
and <workdir>/dgr (a rerun skips them): UTKFace with --data_dir (the paper's recipe),
else built-in MultiDigits with a CPU-sized ResNet-18 (base width 16, stages 1,2,1,1)
for 4 epochs. Every flag it does not know goes to both runs: --epochs, --backbone,
--num_dummy, --weighting, --seed, ... (python -m experiments.utkface --help).
"""

from __future__ import annotations

import argparse
import json
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

PROG = "python -m experiments.probes"
BUILTIN = ["--backbone", "resnet18", "--base_width", "16", "--stage_sizes", "1,2,1,1"]
BUILTIN += ["--epochs", "4"]
PROBES = ("tree", "linear_svm", "knn")
PROBE_NAMES = {"tree": "decision tree", "linear_svm": "linear SVM", "knn": "kNN"}
# Tasks whose classes are ordered (colour maps in order): UTKFace's age bins.
ORDERED_TASKS = {("utkface", "age"): ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+")}


def make_parser() -> argparse.ArgumentParser:
    parser = comparison_parser(PROG, __doc__, "runs/probes")
    add = parser.add_argument
    add(
        "--train_examples",
        type=int,
        default=2000,
        help="training examples the probes are fitted on (the first of epoch 0; default 2000)",
    )
    add(
        "--eval_examples",
        type=int,
        default=1000,
        help="evaluation examples they are scored on (default 1000)",
    )
    add(
        "--tsne_examples",
        type=int,
        default=500,
        help="evaluation examples in the t-SNE (default 500)",
    )
    add("--neighbors", type=int, default=5, help="k of the kNN probe (default 5)")
    add("--probe_seed", type=int, default=0, help="seed of the tree and the t-SNE (default 0)")
    return parser


def parse_args(argv=None):
    parser = make_parser()
    args, passed = parser.parse_known_args(argv)
    for name in ("train_examples", "eval_examples", "neighbors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.tsne_examples < 0:
        parser.error(f"--tsne_examples must be >= 0 (0: no t-SNE), got {args.tsne_examples}")
    dataset = "utkface" if args.data_dir else "multidigits"
    configs = comparison_configs(parser, args, passed, dataset, BUILTIN)
    return args, configs


# ---------------------------------------------------------------------------
# Probes


def fit_probes(train_x, train_y, eval_x, eval_y, *, neighbors: int = 5, seed: int = 0) -> dict:
    """``{probe: accuracy}`` on ``(eval_x, eval_y)`` of each probe (``PROBES``) fitted on
    ``(train_x, train_y)``: a decision tree on the raw features (its splits do not care
    about scale), a linear SVM and kNN on features standardised with the training
    statistics (both measure distances). One class only in training: every probe predicts
    it."""
    import numpy as np
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from sklearn.tree import DecisionTreeClassifier

    train_x, eval_x = np.asarray(train_x, np.float64), np.asarray(eval_x, np.float64)
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    classes = np.unique(train_y)
    if len(classes) < 2:
        accuracy = float(np.mean(eval_y == classes[0]))
        return {probe: accuracy for probe in PROBES}
    models = {
        "tree": DecisionTreeClassifier(random_state=seed),
        "linear_svm": make_pipeline(StandardScaler(), LinearSVC(max_iter=10000, random_state=seed)),
        "knn": make_pipeline(
            StandardScaler(), KNeighborsClassifier(n_neighbors=min(neighbors, len(train_y)))
        ),
    }
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    result = {}
    for probe, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # its accuracy says enough
            model.fit(train_x, train_y)
        result[probe] = float(np.mean(model.predict(eval_x) == eval_y))
    return result


def pooled(features, task: str):
    """A task's view of the features as ``(examples, channels)``: the global average over
    spatial axes; MTAN's dict gives the task's own features."""
    import numpy as np

    array = np.asarray(features[task] if isinstance(features, dict) else features)
    return array.reshape(array.shape[0], -1, array.shape[-1]).mean(axis=1)


def probed_tasks(tasks) -> tuple[list, list[str]]:
    """``(classification tasks, notes on the skipped ones)``."""
    chosen = [t for t in tasks if t.kind == "classification"]
    notes = [
        f"{t.name} ({t.kind}) is skipped: it has no per-example class to probe"
        for t in tasks
        if t.kind != "classification"
    ]
    return chosen, notes


def probe_run(run, args) -> dict:
    """Probe accuracies per task and the t-SNE embedding of one run."""
    import numpy as np

    setup = run.setup
    tasks, notes = probed_tasks(setup.tasks)
    if not tasks:
        raise SystemExit(
            f"{PROG}: {run.label}: no classification task to probe ({'; '.join(notes)})"
        )
    names = [t.name for t in tasks]
    frozen = FrozenFeatures(setup.net)
    say(f"[{run.label}] features of the training and evaluation examples ...")
    train_features, train_labels = frozen.collect(
        run.state, setup.data.train_epoch(0, 0), names, args.train_examples
    )
    eval_features, eval_labels = frozen.collect(
        run.state, setup.data.evaluation(), names, args.eval_examples
    )
    accuracy, chance = {}, {}
    for name in names:
        train_x, eval_x = pooled(train_features, name), pooled(eval_features, name)
        start = time.perf_counter()
        accuracy[name] = fit_probes(
            train_x,
            train_labels[name],
            eval_x,
            eval_labels[name],
            neighbors=args.neighbors,
            seed=args.probe_seed,
        )
        values, counts = np.unique(train_labels[name], return_counts=True)
        chance[name] = float(np.mean(eval_labels[name] == values[np.argmax(counts)]))
        say(
            f"[{run.label}] {name}: "
            + ", ".join(f"{PROBE_NAMES[p]} {a:.3f}" for p, a in accuracy[name].items())
            + f" (majority class {chance[name]:.3f}; {time.perf_counter() - start:.1f} s)"
        )
    embedding = None
    count = min(args.tsne_examples, len(eval_labels[names[0]]))
    if count >= 5:
        embedding = tsne(eval_features, names, count, args.probe_seed)
    return {
        "label": run.label,
        "workdir": str(run.workdir),
        "dgr": run.dgr_text,
        "dataset": run.config.dataset,
        "config": run.config.as_dict(),
        "steps": run.summary.get("steps"),
        "examples": {"train": len(train_labels[names[0]]), "eval": len(eval_labels[names[0]])},
        "accuracy": accuracy,
        "majority_class": chance,
        "skipped": notes,
        "tsne": None
        if embedding is None
        else {
            "points": {k: v.tolist() for k, v in embedding.items()},
            "labels": {n: eval_labels[n][:count].tolist() for n in names},
        },
    }


def tsne(features, names, count: int, seed: int) -> dict:
    """``{task or "shared": (count, 2)}``: one t-SNE of the pooled shared features (MTAN:
    one per task, each of its own features)."""
    from sklearn.manifold import TSNE

    def embed(x):
        perplexity = min(30.0, (len(x) - 1) / 3.0)
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)

    if isinstance(features, dict):
        return {name: embed(pooled(features, name)[:count]) for name in names}
    return {"shared": embed(pooled(features, None)[:count])}


# ---------------------------------------------------------------------------
# Figures and report


def _class_colours(count: int, ordered: bool):
    """One colour per class: ordered classes on viridis in order, others from tab10/tab20."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if ordered:
        return colormaps["viridis"].resampled(count)
    palette = colormaps["tab10" if count <= 10 else "tab20"].colors
    return ListedColormap([palette[i % len(palette)] for i in range(count)])


def _panel(axis, result: dict, name: str, count: int) -> None:
    """One task's t-SNE panel of one run, coloured by the task's class."""
    points, labels = result["tsne"]["points"], result["tsne"]["labels"]
    x, y = zip(*points.get(name, points.get("shared")))
    ordered = ORDERED_TASKS.get((result["dataset"], name))
    colours = _class_colours(count, ordered is not None)
    scatter = axis.scatter(
        x, y, c=labels[name], cmap=colours, vmin=-0.5, vmax=count - 0.5, s=6, alpha=0.8
    )
    bar = axis.figure.colorbar(scatter, ax=axis, ticks=range(count), fraction=0.046)
    if ordered:
        bar.ax.set_yticklabels(ordered[:count])
    bar.ax.tick_params(labelsize=7)
    axis.set_title(f"{result['label']}: {name}", fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_tsne(path: Path, results: list[dict], names: list[str], classes: dict) -> None:
    """A panel per task (rows) and run (columns: the runs side by side); one run: its
    tasks side by side."""
    plt = pyplot()
    rows, cols = (1, len(names)) if len(results) == 1 else (len(names), len(results))
    figure, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.4 * rows), squeeze=False)
    for t, name in enumerate(names):
        for r, result in enumerate(results):
            axis = axes[0, t] if len(results) == 1 else axes[t, r]
            _panel(axis, result, name, classes[name])
    figure.suptitle("t-SNE of the pooled shared features (evaluation set)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(results: list[dict], names: list[str], figures: list[str]) -> str:
    first = results[0]
    lines = [
        "# Probes of the frozen shared features (Fig. 3)",
        "",
        "Runs: "
        + "; ".join(
            f"**{r['label']}** ({r['dgr']}, {r['dataset']}, {r['config']['model']['network']} "
            f"{r['config']['model']['backbone']}, {r['steps']} steps; "
            f"{r['workdir']})"
            for r in results
        )
        + ".",
        "",
        f"Each run's encoder in inference mode; its shared features global-average-pooled; "
        f"probes fitted on {first['examples']['train']} training examples (the first of epoch "
        f"0) and scored on {first['examples']['eval']} evaluation examples: decision tree "
        "(unlimited depth), linear SVM and kNN (both on standardised features). Accuracy; the "
        "last column is the majority class's share of the evaluation set (chance).",
        "",
        "| task | run | decision tree | linear SVM | kNN | majority class |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        for r in results:
            a = r["accuracy"][name]
            lines.append(
                f"| {name} | {r['label']} | {a['tree']:.3f} | {a['linear_svm']:.3f} "
                f"| {a['knn']:.3f} | {r['majority_class'][name]:.3f} |"
            )
    lines.append("")
    if first["skipped"]:
        lines += ["Skipped: " + "; ".join(first["skipped"]) + ".", ""]
    lines += ["## What it shows", "", words(results, names), ""]
    lines += [f"![t-SNE]({f})" for f in figures] + [""]
    return "\n".join(lines)


def words(results: list[dict], names: list[str]) -> str:
    sentences = []
    for name in names:
        best = {}
        for p in PROBES:
            top = max(r["accuracy"][name][p] for r in results)
            leaders = [r["label"] for r in results if r["accuracy"][name][p] == top]
            best[p] = "best " + leaders[0] if len(leaders) == 1 else "tie"
        sentences.append(
            f"{name}: "
            + "; ".join(
                f"{PROBE_NAMES[p]} "
                + ", ".join(f"{r['label']} {r['accuracy'][name][p]:.3f}" for r in results)
                + (f" ({best[p]})" if len(results) > 1 else "")
                for p in PROBES
            )
            + "."
        )
    if len(results) > 1:
        wins = {
            r["label"]: sum(
                r["accuracy"][n][p] == max(o["accuracy"][n][p] for o in results)
                for n in names
                for p in PROBES
            )
            for r in results
        }
        total = len(names) * len(PROBES)
        sentences.append(
            "Best (ties counted for each) of the "
            f"{total} task-probe pairs: "
            + ", ".join(f"{label} {count}" for label, count in wins.items())
            + "."
        )
    accuracies = [r["accuracy"][n][p] for r in results for n in names for p in PROBES]
    mean, count = sum(accuracies) / len(accuracies), results[0]["examples"]["eval"]
    sentences.append(
        f"On {count} evaluation examples an accuracy near {mean:.2f} has a binomial standard "
        f"error of {(mean * (1 - mean) / count) ** 0.5:.3f}; one seed per run, so smaller "
        "differences are noise."
    )
    return " ".join(sentences)


# ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    args, configs = parse_args(argv)
    root = analysis_workdir(args.workdir, PROG)
    start = time.perf_counter()
    runs = comparison_runs(args, configs, root, PROG)
    names = [t.name for t in probed_tasks(runs[0].setup.tasks)[0]]
    classes = {t.name: t.channels for t in runs[0].setup.tasks}
    for run in runs[1:]:
        if [t.name for t in probed_tasks(run.setup.tasks)[0]] != names:
            raise SystemExit(f"{PROG}: --runs: {run.label}'s tasks differ from {runs[0].label}'s")
    results = [probe_run(run, args) for run in runs]
    figures = []
    if all(r["tsne"] is not None for r in results):
        for result in results:
            name = f"tsne_{result['label']}.png"
            plot_tsne(root / name, [result], names, classes)
            figures.append(name)
        plot_tsne(root / "tsne.png", results, names, classes)
        figures.insert(0, "tsne.png")
    settings = {
        k: getattr(args, k)
        for k in ("train_examples", "eval_examples", "tsne_examples", "neighbors", "probe_seed")
    }
    payload = {"settings": settings, "tasks": names, "runs": results}
    (root / "probes.json").write_text(json.dumps(payload))
    (root / "probes.md").write_text(markdown(results, names, figures))
    say(f"wrote {root / 'probes.md'} ({time.perf_counter() - start:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
