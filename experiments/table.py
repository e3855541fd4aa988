"""A table of the paper (Tables 1-3) with seeds, and Fig. 2's bars, in one command.

    python -m experiments.table                                  # built-in data, CPU sizes: minutes
    python -m experiments.table --dataset nyuv2 --data_dir ~/data/nyuv2 --networks split mtan \\
        --methods equal dwa uncertainty pcgrad cagrad imtl nash_mtl --seeds 0 1 2 \\
        --dgr_weight 0.1 --pretrained resnet50.safetensors

The grid: data sets x networks x --methods (MTL weightings, the entry points'
--weighting) x --regularizers x --seeds. Each cell is one ordinary run of
``python -m experiments.<dataset>`` (its own flags, cli.build_config, the run loop) in
<workdir>/<dataset>/<network>/<method>/<vanilla|dgr|sam|pta>/seed_<n>. "none" is the
method alone (--dgr_weight 0), "dgr" the method with DGR (--dgr_weight of this command,
lambda), "sam" and "pta" pass --regularizer to the run. The runs go one after another;
a finished run (its summary.json) is skipped and an interrupted one resumed, so rerunning
the command continues the table. Before each run its command line is printed, and all of
them are in <workdir>/commands.txt: a cluster scheduler can run the cells in parallel,
then this command (all cells done) only writes the table.

Every flag this command does not know goes to every run (--epochs, --backbone,
--batch_size, --pretrained, --reference, --num_dummy, ...: python -m experiments.nyuv2
--help; --sam_rho and --pta_decoders to the SAM / PTA runs only); those it sets itself
(--seed, --weighting, --network, --regularizer, --resume, --overwrite) are refused.
Without --data_dir the runs use built-in data: --synthetic (the entry point's CPU
preset) and --base_width 4 --head_width 8 --stage_sizes 1,1,1,1 --synthetic_size 24x32
--synthetic_counts 8,4 --epochs 2 --batch_size 4 --num_dummy 1, so that the default
grid (nyuv2, split, equal and uncertainty, without and with DGR, seeds 0 and 1: 8 runs)
finishes on a CPU in about 3 minutes (compiled programs are kept in <workdir>/xla_cache,
JAX's persistent compilation cache: the second seed of a cell compiles nothing). Flags
given win over that preset.

Writes into --workdir: table.md (the paper's layout: each method's row and its "+ DGR"
row below it, each task's headline metric and delta_m as mean +- sample std over seeds,
the paper's number beside each; what the numbers show, in words), table.json, fig2.png
(delta_m per method, one bar per regulariser, as the paper's Fig. 2) and commands.txt.
--dry_run lists every run with its state (done / partial at step N / to run) and its
estimated cost, and writes commands.txt only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

from experiments import reporting
from experiments.runs import (
    TINY_PRESET,
    Cell,
    cell_configs,
    refuse_flags,
    run_cells,
    say,
    seconds_per_step,
    use_compilation_cache,
    write_commands,
)

PROG = "python -m experiments.table"
REGULARIZERS = ("none", "dgr", "sam", "pta")
FOLDERS = {"none": "vanilla", "dgr": "dgr", "sam": "sam", "pta": "pta"}
SUFFIXES = {"none": "", "dgr": " + DGR", "sam": " + SAM", "pta": " + PTA"}
# Built-in data: the sweeps' tiny preset and one dummy set (K = 3 compiles programs three
# times as large, most of this command's time on a CPU). Flags given win: --num_dummy 3.
PRESET = (*TINY_PRESET, "--num_dummy", "1")
DEFAULT_METHODS = ("equal", "uncertainty")
# Flags of the runs that this command sets per cell, and its own flag for each.
BLOCKED = {
    "--seed": "--seeds",
    "--weighting": "--methods",
    "--network": "--networks",
    "--regularizer": "--regularizers",
    "--resume": None,
    "--overwrite": None,
}
CONVENTIONS = {"whole_set": "metrics", "paper": "metrics_paper"}


class GridKey(NamedTuple):
    dataset: str
    network: str
    method: str
    regularizer: str
    seed: int


# ---------------------------------------------------------------------------
# Flags and the grid


def make_parser() -> argparse.ArgumentParser:
    from dgr_jax import methods
    from experiments.datasets import DATASETS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --seed must not pass for --seeds, nor --network for --networks
    )
    add = parser.add_argument
    add(
        "--datasets",
        "--dataset",
        nargs="+",
        choices=sorted(DATASETS),
        default=["nyuv2"],
        metavar="DATASET",
        help=f"data sets: {', '.join(sorted(DATASETS))} (default nyuv2); the paper's "
        "Tables 1-3 are utkface, nyuv2 and cityscapes",
    )
    add(
        "--networks",
        nargs="+",
        default=None,
        help="networks (--network of the runs; default each data set's first: split for the "
        "scene data sets, classifier for utkface and multidigits)",
    )
    add(
        "--methods",
        nargs="+",
        choices=sorted(methods.METHODS),
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help="MTL weighting methods (--weighting of the runs; default "
        f"{' '.join(DEFAULT_METHODS)}); any of {', '.join(sorted(methods.METHODS))}",
    )
    add(
        "--regularizers",
        nargs="+",
        choices=REGULARIZERS,
        default=["none", "dgr"],
        help="none: the method alone (--dgr_weight 0); dgr: with DGR (--dgr_weight of this "
        "command); sam, pta: --regularizer sam|pta of the runs (default none dgr: without "
        "and with DGR, the paper's tables)",
    )
    add("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of every cell (default 0 1)")
    add(
        "--dgr_weight",
        type=float,
        default=0.1,
        help="lambda of the with-DGR runs (default 0.1; the paper grid-searches it)",
    )
    add(
        "--workdir",
        default="runs/table",
        help="the table, the figure and one folder per run below it (default runs/table)",
    )
    add(
        "--data_dir",
        nargs="+",
        metavar="[DATASET=]DIR",
        help="the real data: DIR for one data set, DATASET=DIR each for several (multidigits "
        "needs none); without it, built-in data at CPU sizes for every data set",
    )
    add(
        "--convention",
        choices=sorted(CONVENTIONS),
        default="whole_set",
        help="the runs' metrics tabled: whole_set, whole-set statistics (dgr_jax's, the "
        "default); paper, auto-lambda's per-batch means (the paper's; mIoU is NaN when a class "
        "never occurs, as on tiny built-in data)",
    )
    add(
        "--dry_run",
        action="store_true",
        help="list every run with its state and estimated cost, write commands.txt, train nothing",
    )
    return parser


def parse_args(argv=None):
    """``(args, keys, cells, configs)``: this command's flags, and for every cell of the grid
    its key, its run (entry-point flags, workdir) and its ``RunConfig`` (all built before
    anything trains, so a bad flag is one line at once)."""
    from experiments.datasets import DATASETS

    parser = make_parser()
    args, passed = parser.parse_known_args(argv)
    refuse_flags(parser.error, passed, BLOCKED, "the table")
    for name in ("datasets", "networks", "methods", "regularizers", "seeds"):
        values = getattr(args, name)
        if values is not None:
            setattr(args, name, list(dict.fromkeys(values)))  # each once, in the order given
    if "dgr" in args.regularizers and not args.dgr_weight > 0:
        parser.error(f"--dgr_weight must be > 0 for the with-DGR runs, got {args.dgr_weight}")
    passed_to = split_regularizer_flags(passed, args.regularizers, parser.error)
    data = data_flags(args, parser.error)
    networks = {}
    for dataset in args.datasets:
        available = DATASETS[dataset].networks
        chosen = args.networks or [available[0]]
        bad = [n for n in chosen if n not in available]
        if bad:
            parser.error(
                f"--networks {bad[0]}: {dataset} has {' or '.join(available)}; run the data "
                "sets apart if their networks differ"
            )
        networks[dataset] = chosen
    root = Path(args.workdir).expanduser()
    keys, cells = [], []
    for dataset in args.datasets:
        for network in networks[dataset]:
            for method in args.methods:
                for regularizer in args.regularizers:
                    for seed in args.seeds:
                        key = GridKey(dataset, network, method, regularizer, seed)
                        keys.append(key)
                        common = data[dataset] + passed_to[regularizer]
                        cells.append(cell_of(key, common, args.dgr_weight, root))
    return args, keys, cells, cell_configs(cells, parser.error)


def data_flags(args, fail) -> dict[str, list[str]]:
    """The data flags of each data set's runs: built-in data with the CPU preset, or the
    real data of --data_dir."""
    from experiments.datasets import DATASETS

    if not args.data_dir:
        return {d: ["--synthetic", *PRESET] for d in args.datasets}
    folders = {}
    for item in args.data_dir:
        name, sep, folder = item.partition("=")
        if not sep:
            needing = [d for d in args.datasets if DATASETS[d].needs_data_dir]
            if len(needing) != 1 or len(args.data_dir) != 1:
                fail(f"--data_dir {item}: with several data sets, give DATASET=DIR for each")
            name, folder = needing[0], item
        if name not in args.datasets:
            fail(f"--data_dir {item}: {name} is not one of --datasets {' '.join(args.datasets)}")
        folders[name] = folder
    flags = {}
    for dataset in args.datasets:
        if dataset in folders:
            flags[dataset] = ["--data_dir", folders[dataset]]
        elif not DATASETS[dataset].needs_data_dir:
            flags[dataset] = []
        else:
            fail(f"--data_dir: no folder for {dataset} (give {dataset}=DIR)")
    return flags


def split_regularizer_flags(passed: list[str], regularizers, fail) -> dict[str, list[str]]:
    """The passed flags of each regulariser's runs: a flag that only one regulariser
    reads (--sam_rho, --pta_decoders: the entry points refuse it for the others) goes to
    its runs only, every other flag to all."""
    from experiments import config as config_lib

    owners = {
        config_lib.describe_field(f"regularizer.{field}"): name
        for name, spec in getattr(config_lib, "REGULARIZERS", {}).items()
        for field in spec.fields
    }
    groups, current = [], None  # [flag, values...] per flag given
    for token in passed:
        if token.startswith("--") or current is None:
            current = [token]
            groups.append(current)
        else:
            current.append(token)
    result = {r: [] for r in regularizers}
    for group in groups:
        owner = owners.get(group[0].split("=")[0])
        if owner is not None and owner not in regularizers:
            fail(f"{group[0].split('=')[0]} applies to {owner} runs, and --regularizers has none")
        for regularizer in regularizers:
            if owner in (None, regularizer):
                result[regularizer] += group
    return result


def cell_of(key: GridKey, common: list[str], dgr_weight: float, root: Path) -> Cell:
    """The run of one cell: the common flags, then this command's own for the cell (last,
    so that they win). Without DGR is --dgr_weight 0; SAM and PTA runs take
    --regularizer, which turns DGR off (the entry points refuse --dgr_weight with it)."""
    regularizer = key.regularizer
    flags = [*common, "--network", key.network, "--weighting", key.method]
    if regularizer in ("none", "dgr"):
        flags += ["--dgr_weight", repr(dgr_weight) if regularizer == "dgr" else "0"]
    else:
        flags += ["--regularizer", regularizer]
    flags += ["--seed", str(key.seed)]
    suffix = SUFFIXES[regularizer].replace(" + ", " +")
    label = f"{key.dataset} {key.network} {key.method}{suffix} seed {key.seed}"
    folder = root / key.dataset / key.network / key.method / FOLDERS[regularizer]
    return Cell(label, key.dataset, tuple(flags), folder / f"seed_{key.seed}")


# ---------------------------------------------------------------------------
# The table


def row_name(method: str, regularizer: str) -> str:
    """The row's name as the paper prints its method ("equal" -> "Vanilla"), then
    " + DGR" / " + SAM" / " + PTA"."""
    from dgr_jax.paper_tables import paper_method_name

    return paper_method_name(method, False) + SUFFIXES[regularizer]


def paper_row(config, method: str, regularizer: str) -> tuple[str | None, dict | None]:
    """The paper's row for a cell (its name and values, as ``results_table`` picks it):
    ``(None, None)`` where the paper has none (no table for the data set, a method it does
    not report, SAM and PTA, which it shows as Fig. 2's bars only)."""
    from dgr_jax.paper_tables import paper_method_name

    if regularizer not in ("none", "dgr"):
        return None, None
    rows = config.spec.paper_rows(config.model.network)
    name = paper_method_name(method, regularizer == "dgr")
    names = ([f"{name} (K={config.dgr.num_dummy})"] if regularizer == "dgr" else []) + [name]
    found = next((n for n in names if n in rows), None)
    return found, (rows[found] if found else None)


def run_values(config, summary: dict, convention: str) -> dict[str, float | None]:
    """A run's headline metrics in ``convention`` and its Δm, computed here from them
    and the single-task reference (--reference, else the data set's), None without one."""
    from dgr_jax import metrics as metric_lib

    tasks = config.task_records()
    source = summary[CONVENTIONS[convention]]
    values = {k: float(source[k]) for k in reporting.shown_keys(source, tasks)}
    reference = config.reference if config.reference is not None else config.spec.paper_reference
    values["delta_m"] = metric_lib.delta_m(source, reference, tasks) if reference else None
    return values


def tabulate(args, keys, configs, summaries) -> dict:
    """``{"groups": [{dataset, network, metric_keys, rows: [...]}, ...]}``: one group per data set
    and network (the paper's column groups), one row per method and regulariser, each with
    its per-seed values, mean and std (ddof=1; None for one seed) and the paper's row."""
    groups = {}
    for key, config, summary in zip(keys, configs, summaries):
        group = groups.setdefault(
            (key.dataset, key.network),
            {
                "dataset": key.dataset,
                "network": key.network,
                "tasks": [t.name for t in config.task_records()],
                "lower_is_better": {
                    t.headline_key: t.record.lower_is_better for t in config.task_records()
                },
                "reference": reference_words(config),
                "rows": {},
            },
        )
        row = group["rows"].setdefault(
            (key.method, key.regularizer),
            {
                "name": row_name(key.method, key.regularizer),
                "method": key.method,
                "regularizer": key.regularizer,
                "seeds": {},
            },
        )
        row["seeds"][str(key.seed)] = run_values(config, summary, args.convention)
        row["paper_row"], row["paper"] = paper_row(config, key.method, key.regularizer)
        group.setdefault("has_paper_table", bool(config.spec.paper_rows(key.network)))
    result = []
    for group in groups.values():
        rows = list(group.pop("rows").values())
        group["metric_keys"] = [k for k in next(iter(rows[0]["seeds"].values())) if k != "delta_m"]
        for row in rows:
            row["mean"], row["std"] = {}, {}
            for name in [*group["metric_keys"], "delta_m"]:
                values = [v.get(name) for v in row["seeds"].values()]
                if any(v is None for v in values):
                    row["mean"][name] = row["std"][name] = None
                    continue
                row["mean"][name], row["std"][name] = reporting.mean_std(values)
        group["rows"] = rows
        result.append(group)
    return {
        "convention": args.convention,
        "std": "sample standard deviation over seeds (ddof=1); none for one seed",
        "seeds": args.seeds,
        "dgr_weight": args.dgr_weight,
        "groups": result,
    }


def reference_words(config) -> str:
    if config.reference is not None:
        return "the single-task metrics of --reference"
    if config.spec.paper_reference:
        words = "the paper's single-task results (its Single row)"
        if config.data.synthetic:
            words += (
                "; on built-in data this checks the pipeline, not DGR: pass --reference with "
                "your single-task runs' summary.json for a meaningful Δm"
            )
        return words
    return ""


def markdown(table: dict) -> str:
    seeds = table["seeds"]
    spread = (
        f"mean ± sample standard deviation (ddof=1) over {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))})"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): no ±"
    )
    convention = {
        "whole_set": "whole-set statistics (dgr_jax's convention; the paper's numbers are "
        "auto-lambda's per-batch means, --convention paper)",
        "paper": "auto-lambda's per-batch means (the paper's convention)",
    }[table["convention"]]
    lines = [
        "# The paper's table with seeds",
        "",
        f'Each cell: {spread}; metrics are {convention}. Δm in percent. "paper": the '
        "paper's number for the row (ResNet-50, full data, mean of three runs), where it has one.",
    ]
    for group in table["groups"]:
        lines += ["", f"## {group['dataset']}, {group['network']} network", ""]
        keys = group["metric_keys"]

        arrows = {k: " ↓" if low else " ↑" for k, low in group["lower_is_better"].items()}
        header = "| method | " + " | ".join(f"{k}{arrows.get(k, '')} | paper" for k in keys)
        lines += [header + " | Δm | paper |", "|---" * (2 * len(keys) + 3) + "|"]
        for row in group["rows"]:
            cells = [row["name"]]
            for key in [*keys, "delta_m"]:
                mean, std = row["mean"][key], row["std"][key]
                percent = key == "delta_m"
                cells.append(
                    "-" if mean is None else reporting.format_mean_std(mean, std, percent=percent)
                )
                value = (row["paper"] or {}).get(key)
                cells.append(
                    "-"
                    if value is None
                    else reporting.format_mean_std(value, None, percent=percent)
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *findings(group)]
    return "\n".join(lines)


def findings(group: dict) -> list[str]:
    """What the group's numbers show, in sentences."""
    words = []
    if group["reference"]:
        words.append(f"Δm is against {group['reference']}.")
    else:
        words.append(
            f"No single-task reference for {group['dataset']}, so no Δm: pass --reference with "
            "the summary.json files of single-task runs (--tasks <one task>)."
        )
    rows = {(r["method"], r["regularizer"]): r for r in group["rows"]}
    for regularizer in ("dgr", "sam", "pta"):
        pairs = [
            (rows[(m, "none")], r)
            for (m, reg), r in rows.items()
            if reg == regularizer and (m, "none") in rows
        ]
        diffs = []
        for base, other in pairs:
            a, b = base["mean"]["delta_m"], other["mean"]["delta_m"]
            if a is None or b is None:
                continue
            spread = max([s for s in (base["std"]["delta_m"], other["std"]["delta_m"]) if s] or [0])
            paper = ""
            if base["paper"] and other["paper"]:
                paper = (
                    f", paper {100 * (other['paper']['delta_m'] - base['paper']['delta_m']):+.2f}"
                )
            within = " (within the seeds' spread)" if abs(b - a) <= spread else ""
            diffs.append((b - a, f"{base['name']} {100 * (b - a):+.2f}{paper}{within}"))
        if diffs:
            better = sum(d > 0 for d, _ in diffs)
            words.append(
                f"{SUFFIXES[regularizer].strip()} changes Δm by (points): "
                + "; ".join(text for _, text in diffs)
                + f". It raises Δm for {better} of {len(diffs)} methods."
            )
    if not group["has_paper_table"]:
        words.append(f"The paper has no table for {group['dataset']}: no paper column values.")
    else:
        missing = sorted(
            {
                r["name"]
                for r in group["rows"]
                if r["paper"] is None and r["regularizer"] in ("none", "dgr")
            }
        )
        if missing:
            words.append(f"The paper has no row for {', '.join(missing)}.")
    if any(r["regularizer"] in ("sam", "pta") for r in group["rows"]):
        words.append("The paper shows SAM and PTA only as Fig. 2's bars: no numbers beside them.")
    return [" ".join(words)]


def plot_figure(table: dict, path: Path) -> Path:
    """Fig. 2: Δm per method, one bar per regulariser (error bars: the seeds' std), one
    panel per data set and network; the paper's Δm as black marks where it has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = table["groups"]
    widest = max(len({r["method"] for r in g["rows"]}) for g in groups)
    size = (len(groups) * (1.5 + 1.6 * widest), 3.8)
    figure, axes = plt.subplots(1, len(groups), figsize=size, squeeze=False)
    for axis, group in zip(axes[0], groups):
        methods = list(dict.fromkeys(r["method"] for r in group["rows"]))
        regularizers = list(dict.fromkeys(r["regularizer"] for r in group["rows"]))
        rows = {(r["method"], r["regularizer"]): r for r in group["rows"]}
        width = 0.8 / len(regularizers)
        drawn = False
        for i, regularizer in enumerate(regularizers):
            x = np.arange(len(methods)) + (i - (len(regularizers) - 1) / 2) * width
            means = [100 * ((rows[(m, regularizer)]["mean"]["delta_m"]) or np.nan) for m in methods]
            stds = [100 * (rows[(m, regularizer)]["std"]["delta_m"] or 0.0) for m in methods]
            label = "without" if regularizer == "none" else regularizer.upper()
            axis.bar(x, means, width, yerr=stds, capsize=3, label=label)
            drawn |= any(np.isfinite(means))
            paper = [
                100 * rows[(m, regularizer)]["paper"]["delta_m"]
                if rows[(m, regularizer)]["paper"]
                else np.nan
                for m in methods
            ]
            if any(np.isfinite(paper)):
                axis.plot(x, paper, "k_", markersize=14, mew=2, label=None if i else "paper")
        axis.set_xticks(np.arange(len(methods)), [row_name(m, "none") for m in methods])
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_ylabel("Δm (%)")
        axis.set_title(f"{group['dataset']}, {group['network']}")
        if not drawn:
            axis.text(0.5, 0.5, "no Δm: pass --reference", ha="center", transform=axis.transAxes)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------
# --dry_run: the runs and their cost


def planned_steps(config, cache: dict) -> int:
    """The run's steps: --steps, else epochs x the batches of an epoch of its data."""
    data_key = json.dumps([config.dataset, config.as_dict()["data"], config.train.batch_size])
    if data_key not in cache:
        cache[data_key] = len(config.spec.open(config, verbose=False).train_epoch(0, 0))
    if config.train.steps is not None:
        return config.train.steps
    return config.train.epochs * cache[data_key]


def parameter_count(config, cache: dict) -> int:
    """Total parameters (encoder, heads, dummy sets) from the entry point's --dry_run."""
    from experiments.dry_run import dry_run

    tree = config.as_dict()
    model_key = json.dumps([tree[k] for k in ("dataset", "model", "tasks", "dgr") if k in tree])
    if model_key not in cache:
        with contextlib.redirect_stdout(io.StringIO()):
            cache[model_key] = dry_run(config)["total_params"]
    return cache[model_key]


def estimate(index: int, keys, rates, params) -> tuple[float | None, str]:
    """Seconds per step of cell ``index`` and what the number is based on: its own
    measured sessions, else the median of the closest measured cells (the same cell's
    other seeds, then the same data set, network and regulariser), else a measured cell
    scaled by parameter count, else nothing."""
    if rates[index] is not None:
        return rates[index], "measured on this run"
    key = keys[index]
    levels = (
        ("other seeds", lambda k: k[:4] == key[:4]),
        ("same data set, network and regulariser", lambda k: k[:2] == key[:2] and k[3] == key[3]),
    )
    for words, similar in levels:
        found = [r for k, r in zip(keys, rates) if r is not None and similar(k)]
        if found:
            return statistics.median(found), f"measured on {words}"
    for words, similar in (
        ("of the same regulariser", lambda k: k[3] == key[3]),
        ("", lambda k: True),
    ):
        found = [
            (r, params[i])
            for i, (k, r) in enumerate(zip(keys, rates))
            if r is not None and similar(k)
        ]
        if found:
            rate, size = min(found, key=lambda pair: abs(pair[1] - params[index]))
            return rate * params[index] / size, f"scaled by parameters from a run {words}".strip()
    return None, "no run measured yet"


def dry_run(keys, cells, configs, root: Path, log=say) -> dict:
    steps_cache, param_cache = {}, {}
    rates = [seconds_per_step(cell.workdir) for cell in cells]
    params = [parameter_count(config, param_cache) for config in configs]
    runs, total, unknown = [], 0.0, 0
    for number, (cell, config) in enumerate(zip(cells, configs), 1):
        steps = planned_steps(config, steps_cache)
        state, at = cell.state()
        done = {"done": steps, "partial": at}.get(state, 0) or 0
        rate, basis = estimate(number - 1, keys, rates, params)
        left = max(steps - done, 0)
        seconds = None if rate is None else left * rate
        if left and seconds is None:
            unknown += 1
        total += seconds or 0.0
        shown = {"done": "done", "partial": f"partial at step {at}"}.get(state, "to run")
        if rate is None:
            cost = f"cost unknown ({basis})"
        else:
            cost = f"{rate:.2f} s/step ({basis})"
            cost = f"~{seconds:.0f} s left, {cost}" if left else cost
        log(
            f"[{number}/{len(cells)}] {cell.label}: {shown}, {steps} steps, "
            f"{params[number - 1]:,} parameters; {cost}"
        )
        runs.append(
            dict(
                label=cell.label,
                workdir=str(cell.workdir),
                state=state,
                step=at,
                steps=steps,
                parameters=params[number - 1],
                seconds_per_step=rate,
                estimate_basis=basis,
                seconds_left=seconds,
                command=cell.command(),
            )
        )
    pending = sum(r["state"] != "done" for r in runs)
    known = f"about {total:.0f} s on this machine" + (
        f" plus {unknown} runs of unknown cost" if unknown else ""
    )
    log(
        f"{pending} of {len(runs)} runs to go, "
        + (known if unknown < pending else "cost unknown until one run has been measured")
        + ". Seconds per step are the wall times that this command recorded for its runs "
        "(wall_time.jsonl in each run folder: compilation, evaluation and checkpoints "
        "included, so short runs overstate the per-step cost of long ones)."
    )
    root.mkdir(parents=True, exist_ok=True)
    write_commands(root / "commands.txt", cells)
    log(f"wrote {root / 'commands.txt'}")
    return {"runs": runs, "seconds_left": total, "unknown": unknown}


# ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    args, keys, cells, configs = parse_args(argv)
    root = Path(args.workdir).expanduser()
    if args.dry_run:
        return dry_run(keys, cells, configs, root)
    from experiments.loop import Stopped

    root.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(root)
    write_commands(root / "commands.txt", cells)
    try:
        summaries = run_cells(cells, configs, PROG)
    except Stopped as stop:
        print(f"{PROG}: {stop}; rerun the same command to continue", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    table = tabulate(args, keys, configs, summaries)
    table["runs"] = {
        str(cell.workdir.relative_to(root)): {k: s[k] for k in CONVENTIONS.values()}
        for cell, s in zip(cells, summaries)
    }
    text = markdown(table)
    (root / "table.md").write_text(text + "\n")
    (root / "table.json").write_text(json.dumps(table, indent=1, default=reporting.jsonable))
    figure = plot_figure(table, root / "fig2.png")
    say("\n" + text + f"\n\nwrote {root / 'table.md'}, {root / 'table.json'}, {figure}")
    return table


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
