"""What a run writes for people: JSON lines, TensorBoard events, the summary, the
markdown table beside the paper's, the curves PNG, and the progress bar.

Everything here runs on process 0 only (``Writers(enabled=...)``) and reads numbers the
run loop computed; nothing here computes a metric.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from dgr_jax import paper_tables

METRIC_CONVENTIONS = {
    "metrics": "whole-set statistics (dgr_jax's): every metric from sums over the whole evaluation set",
    "metrics_paper": "the paper's (auto-lambda's TaskMetric): per-batch values averaged over batches, "
    "weighted by batch size; mIoU over every class (NaN if one never occurs); "
    "normals valid where their channels do not sum to 0",
}


def jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class Writers:
    """JSON lines and TensorBoard event files in the workdir (process 0 only)."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        if enabled:
            import tensorflow as tf  # experiments may use TF; dgr_jax never does

            tf.config.set_visible_devices([], "GPU")
            self._tf = tf
            self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        if not self.enabled:
            return
        with open(self.workdir / f"{kind}.jsonl", "a") as f:
            f.write(
                json.dumps({"step": step, **{k: jsonable(v) for k, v in values.items()}}) + "\n"
            )
        with self._tb.as_default(step=step):
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tf.summary.scalar(f"{kind}/{key}", value)
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_curves(workdir: Path, tasks) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(kind):
        path = workdir / f"{kind}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    train, evals = read("train"), read("eval")
    if not train:
        return None
    keys = [f"loss/{t.name}" for t in tasks] + ["dgr/penalty"]
    figure, axes = plt.subplots(1, 1 + len(tasks), figsize=(4.2 * (1 + len(tasks)), 3.8))
    for key in keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points and any(v for _, v in points):
            axes[0].plot(*zip(*points), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    for axis, t in zip(axes[1:], tasks):  # one panel per task: the metrics have different scales
        key = t.headline_key
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            axis.plot(*zip(*points), marker="o")
        axis.set_xlabel("step")
        axis.set_title(f"eval {key}")
    figure.tight_layout()
    path = workdir / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# Metrics printed (and tabled) beside the headline when a task reports them.
SHOWN_BESIDE_HEADLINE = ("top5",)


def shown_keys(values, tasks) -> list[str]:
    """Each task's headline key, then those of ``SHOWN_BESIDE_HEADLINE`` it reports."""
    keys = []
    for t in tasks:
        keys.append(t.headline_key)
        keys += [f"{t.name}/{m}" for m in SHOWN_BESIDE_HEADLINE if f"{t.name}/{m}" in values]
    return keys


def format_metrics(values, paper, tasks) -> str:
    parts = [f"{key} {values[key]:.4f}" for key in shown_keys(values, tasks)]
    if "delta_m" in values:
        parts.append(
            f"Δm {values['delta_m'] * 100:+.2f}% (paper's convention {paper['delta_m'] * 100:+.2f}%)"
        )
    return ", ".join(parts)


def results_table(config, tasks, values: dict[str, float], paper_values: dict[str, float]) -> str:
    """Our rows in the paper's table format (headline metric per task, Δm): in the paper's
    metric convention, which is the one to compare with the paper's row beside it (where
    the paper has one), and in ours (whole-set statistics). The paper's row is the one of
    the run's method, for its number of dummy sets where the paper has one per count
    (ImageNet, Table 4(a))."""
    keys = shown_keys(values, tasks)
    method = paper_tables.paper_method_name(config.method.name, config.dgr.on)
    if not config.regularizer.spec.dgr and config.regularizer.name != "none":
        method = f"{method} + {config.regularizer.name.upper()}"  # no paper row: Fig. 2's
    header = "| run | " + " | ".join(keys) + " | Δm |"
    rule = "|" + "---|" * (len(keys) + 2)

    def row(name, source):
        cells = [f"{source[k]:.4f}" if k in source else "-" for k in keys]
        dm = source.get("delta_m")
        return (
            f"| {name} | "
            + " | ".join(cells)
            + f" | {'-' if dm is None else f'{dm * 100:+.2f}%'} |"
        )

    lines = [
        header,
        rule,
        row(f"this run: {method} (paper's convention)", paper_values),
        row(f"this run: {method} (whole-set)", values),
    ]
    paper = config.spec.paper_rows(config.model.network)
    names = ([f"{method} (K={config.dgr.num_dummy})"] if config.dgr.on else []) + [method]
    name = next((n for n in names if n in paper), None)
    if name is not None:
        lines.append(row(f"paper: {name}", paper[name]))
    lines.append("")
    lines.append(
        "The paper's row compares with this run's first row (per-batch running means, as "
        "auto-lambda's TaskMetric); the whole-set row is dgr_jax's convention."
    )
    return "\n".join(lines)


def write_summary(workdir: Path, summary: dict, config, tasks, log) -> None:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=jsonable))
    table = results_table(config, tasks, summary["metrics"], summary["metrics_paper"])
    (workdir / "results.md").write_text(table + "\n")
    curves = plot_curves(workdir, tasks)
    log("\n" + table)
    log(
        f"wrote {workdir / 'summary.json'}, {workdir / 'results.md'}"
        f"{', ' + str(curves) if curves else ''}, TensorBoard events in {workdir / 'tensorboard'}"
    )


class _NoBar:
    def update(self, n):
        pass

    def write(self, text):
        print(text, flush=True)

    def close(self):
        pass


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    )


def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1: the spread of seeds, which sample the
    runs one could have had) of ``values``; the std is None for a single value."""
    values = np.asarray(list(values), np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def format_mean_std(mean: float, std: float | None, *, percent: bool = False) -> str:
    """``"0.4602 ± 0.0031"``, or Δm-style ``"+6.32 ± 0.41%"`` with ``percent`` (fractions
    in, percent out); no "±" part for a single value."""
    if percent:
        return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}") + "%"
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
