"""The paper's Table 4(a): Δm by number of primary tasks and number of dummy sets.

    python -m experiments.table4a --data_dir_nyuv2 ~/data/nyuv2 --data_dir_cityscapes ~/data/cityscapes
    python -m experiments.table4a --synthetic --small          # built-in data, minutes on a CPU

For each data set: a single-task vanilla run per task used (the references of Δm, as
the paper's "vs Vanilla"), then every (primary tasks, dummy sets) pair of the grid: the first
T tasks of the data set, trained without DGR (0 dummy sets) or with DGR and K dummy
sets. Each run is an ordinary run of ``experiments.<dataset>`` in its own workdir
under ``--workdir``; a finished run (its ``summary.json``) is skipped and an interrupted
one resumed, so the sweep itself resumes. Every flag it does not know is passed to every
run (``--epochs 20 --backbone resnet18 ...``). It writes ``table4a.md`` (ours beside the
paper's values) and ``table4a.json`` (``{"runs": {...}, "delta_m": {dataset: {T: {K:
...}}}}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dgr_jax import metrics as metric_lib
from dgr_jax.paper_tables import PAPER_TABLE_4A, PAPER_TABLE_4A_DUMMY
from experiments.runs import TINY_PRESET, Cell, cell_configs, refuse_flags, run_cells

PROG = "python -m experiments.table4a"
DATASETS = ("nyuv2", "cityscapes")
SMALL = list(TINY_PRESET)  # a CPU preset: tiny networks and data, a few epochs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="default both"
    )
    parser.add_argument(
        "--num_tasks",
        nargs="+",
        type=int,
        default=[1, 2, 3],
        help="numbers of primary tasks (the first T of the data set's; default 1 2 3)",
    )
    parser.add_argument(
        "--num_dummy",
        nargs="+",
        type=int,
        default=list(PAPER_TABLE_4A_DUMMY),
        help="numbers of dummy sets; 0 is the vanilla network without DGR (default "
        f"{' '.join(map(str, PAPER_TABLE_4A_DUMMY))}, the paper's columns)",
    )
    parser.add_argument(
        "--dgr_weight", type=float, default=0.1, help="lambda of the DGR runs (default 0.1)"
    )
    parser.add_argument(
        "--workdir",
        default="runs/table4a",
        help="one folder per run below it (default runs/table4a)",
    )
    for name in DATASETS:
        parser.add_argument(f"--data_dir_{name}", metavar="DIR", help=f"the real {name} folder")
    parser.add_argument("--synthetic", action="store_true", help="built-in data for every data set")
    parser.add_argument("--small", action="store_true", help=f"the CPU preset: {' '.join(SMALL)}")
    args, passed = parser.parse_known_args(argv)
    for name in ("num_tasks", "num_dummy"):
        low = 1 if name == "num_tasks" else 0
        bad = [v for v in getattr(args, name) if v < low]
        if bad:
            parser.error(f"--{name} must be >= {low}, got {bad[0]}")
    if max(args.num_tasks) > 3:
        parser.error(f"--num_tasks: these data sets have 3 tasks, got {max(args.num_tasks)}")
    if not args.dgr_weight > 0:
        parser.error(f"--dgr_weight must be > 0, got {args.dgr_weight}")
    for name in args.datasets:
        if not args.synthetic and getattr(args, f"data_dir_{name}") is None:
            parser.error(f"--data_dir_{name} DIR is needed for {name} (or pass --synthetic)")
    blocked = ("--tasks", "--dgr_weight", "--num_dummy", "--workdir", "--resume", "--overwrite")
    refuse_flags(parser.error, passed, blocked, "the sweep")
    args.fail = parser.error
    return args, passed


def plan(args) -> list[tuple[str, str, list[str]]]:
    """``(dataset, run name, flags)`` for every run of the sweep, references first."""
    from experiments.datasets import DATASETS as SPECS

    runs = []
    for dataset in args.datasets:
        names = [t.name for t in SPECS[dataset].tasks]
        data = (
            ["--synthetic"]
            if args.synthetic
            else ["--data_dir", getattr(args, f"data_dir_{dataset}")]
        )
        for task in names[: max(args.num_tasks)]:
            runs.append((dataset, f"single_{task}", data + ["--tasks", task, "--dgr_weight", "0"]))
        for count in args.num_tasks:
            for k in args.num_dummy:
                if count == 1 and k == 0:
                    continue  # the first single-task run
                dgr = (
                    ["--dgr_weight", "0"]
                    if k == 0
                    else ["--dgr_weight", str(args.dgr_weight), "--num_dummy", str(k)]
                )
                runs.append(
                    (
                        dataset,
                        f"tasks{count}_dummy{k}",
                        data + ["--tasks", ",".join(names[:count])] + dgr,
                    )
                )
    return runs


def run_name(dataset_names: list[str], count: int, k: int) -> str:
    return f"single_{dataset_names[0]}" if count == 1 and k == 0 else f"tasks{count}_dummy{k}"


def main(argv=None) -> dict:
    args, passed = parse_args(argv)
    from experiments.datasets import DATASETS as SPECS

    root = Path(args.workdir).expanduser()
    extra = (SMALL if args.small else []) + passed
    runs = plan(args)
    cells = [
        Cell(f"{dataset} {name}", dataset, tuple(flags + extra), root / dataset / name)
        for dataset, name, flags in runs
    ]
    done = run_cells(cells, cell_configs(cells, args.fail), PROG)
    summaries = {(dataset, name): s for (dataset, name, _), s in zip(runs, done)}

    table, result = {}, {"runs": {f"{d}/{n}": s["metrics"] for (d, n), s in summaries.items()}}
    for dataset in args.datasets:
        tasks = SPECS[dataset].tasks
        names = [t.name for t in tasks]
        reference = {}
        for task in names[: max(args.num_tasks)]:
            reference.update(summaries[(dataset, f"single_{task}")]["metrics"])
        rows = {}
        for count in args.num_tasks:
            rows[count] = {
                k: metric_lib.delta_m(
                    summaries[(dataset, run_name(names, count, k))]["metrics"],
                    reference,
                    tasks[:count],
                )
                for k in args.num_dummy
            }
        table[dataset] = rows
    result["delta_m"] = {
        d: {str(t): {str(k): v for k, v in r.items()} for t, r in rows.items()}
        for d, rows in table.items()
    }
    text = markdown(table, args.num_dummy)
    (root / "table4a.md").write_text(text + "\n")
    (root / "table4a.json").write_text(json.dumps(result, indent=1))
    print("\n" + text + f"\nwrote {root / 'table4a.md'}, {root / 'table4a.json'}")
    return result


def markdown(table: dict, dummy_counts: list[int]) -> str:
    """Ours (Δm against our single-task runs) and, for the paper's columns, its values."""

    def column(k):
        return "Vanilla" if k == 0 else f"DGR, K={k}"

    header = "| data set (primary tasks) | " + " | ".join(column(k) for k in dummy_counts) + " |"
    lines = [header, "|---" * (len(dummy_counts) + 1) + "|"]
    for dataset, rows in table.items():
        for count, values in rows.items():
            ours = " | ".join(f"{100 * values[k]:+.2f}%" for k in dummy_counts)
            lines.append(f"| {dataset} ({count}), this run | {ours} |")
            paper = PAPER_TABLE_4A.get((dataset, count))
            if paper is not None:
                printed = dict(zip(PAPER_TABLE_4A_DUMMY, paper))
                cells = " | ".join(
                    f"{printed[k]:+.2f}%" if k in printed else "-" for k in dummy_counts
                )
                lines.append(f"| {dataset} ({count}), paper | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
