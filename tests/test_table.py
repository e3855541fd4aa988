"""python -m experiments.table: a grid of ordinary runs, resumable, tabled with seeds.

One tiny grid (MultiDigits, equal weighting without and with DGR, seeds 0 and 1, two steps
a run) is made the hard way: the command in a subprocess, killed once its first run has
finished; the second run then trained to step 1 only (an interrupted run); the command
run again. The tests read what that left: nothing repeated, the table's numbers against
a hand computation from the runs' summary.json files, the dry run's states and costs.
"""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import table
from experiments.runs import WALL_TIME_FILE, train_or_skip

pytestmark = pytest.mark.usefixtures("private_cache")

REFERENCE = {"left/acc": 0.5, "right/acc": 0.4}  # single-task accuracies for Δm, by hand
SEEDS = (0, 1)


def argv(root: Path, reference: Path | None = None) -> list[str]:
    grid = ["--dataset", "multidigits", "--methods", "equal", "--seeds", *map(str, SEEDS)]
    reference = reference or root / "reference.json"
    passed = ["--steps", "2", "--batch_size", "50", "--reference", str(reference)]
    return grid + passed + ["--workdir", str(root)]


def folder(root: Path, regularizer: str, seed: int) -> Path:
    return root / "multidigits" / "classifier" / "equal" / regularizer / f"seed_{seed}"


def files_and_times(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def quietly(function, *args):
    """``function(*args)`` and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = function(*args)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    (root / "reference.json").write_text(json.dumps(REFERENCE))
    first = folder(root, "vanilla", 0)
    log = open(root / "killed.log", "w")
    command = [sys.executable, "-m", "experiments.table", *argv(root)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 240
    # the run's wall time is the last file of a finished run (after summary.json, curves.png)
    while not (first / WALL_TIME_FILE).exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the first run did not finish in time"
        time.sleep(0.05)
    process.kill()
    process.wait()
    log.close()
    assert (first / "summary.json").exists(), (root / "killed.log").read_text()[-2000:]
    before = files_and_times(first)

    # The second run interrupted after its first step (whatever the kill left of it).
    args, keys, cells, configs = table.parse_args(argv(root))
    shutil.rmtree(cells[1].workdir, ignore_errors=True)
    quietly(lambda: train_or_skip(configs[1], cells[1].workdir, "partial", stop_after=1))
    dry, dry_out = quietly(table.main, argv(root) + ["--dry_run"])
    result, out = quietly(table.main, argv(root))
    again, again_out = quietly(table.main, argv(root))
    return dict(
        root=root,
        before=before,
        killed=(root / "killed.log").read_text(),
        dry=dry,
        dry_out=dry_out,
        result=result,
        out=out,
        again=again,
        again_out=again_out,
        cells=cells,
    )


def test_killed_after_the_first_run_the_rerun_repeats_nothing(grid):
    root, out = grid["root"], grid["out"]
    assert "[1/4] multidigits classifier equal seed 0: starting" in grid["killed"]
    assert "[1/4] multidigits classifier equal seed 0: done before, skipped" in out
    assert "[1/4] multidigits classifier equal seed 0: starting" not in out
    first = folder(root, "vanilla", 0)
    assert files_and_times(first) == grid["before"]  # not a file touched
    steps = [json.loads(line)["step"] for line in (first / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # the interrupted run went on from its checkpoint; the others started
    assert "[2/4] multidigits classifier equal seed 1: resuming from step 1" in out
    second = folder(root, "vanilla", 1)
    steps = [json.loads(line)["step"] for line in (second / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    sessions = [json.loads(line) for line in (second / WALL_TIME_FILE).read_text().splitlines()]
    assert [(s["from_step"], s["to_step"]) for s in sessions] == [(0, 1), (1, 2)]
    for number, label in ((3, "equal +DGR seed 0"), (4, "equal +DGR seed 1")):
        assert f"[{number}/4] multidigits classifier {label}: starting" in out
    # complete: every row has every seed, and a third call only reads
    rows = grid["result"]["groups"][0]["rows"]
    assert [(r["name"], sorted(r["seeds"])) for r in rows] == [
        ("Vanilla", ["0", "1"]),
        ("Vanilla + DGR", ["0", "1"]),
    ]
    assert grid["again_out"].count("done before, skipped") == 4
    assert "starting" not in grid["again_out"]
    assert grid["again"]["groups"] == grid["result"]["groups"]


def test_the_table_against_a_hand_computation(grid):
    root = grid["root"]
    group = grid["result"]["groups"][0]
    assert group["metric_keys"] == ["left/acc", "right/acc"]
    text = (root / "table.md").read_text()
    for row, regularizer in zip(group["rows"], ("vanilla", "dgr")):
        runs = [
            json.loads((folder(root, regularizer, s) / "summary.json").read_text())["metrics"]
            for s in SEEDS
        ]
        cells = [row["name"]]
        for key in ["left/acc", "right/acc", "delta_m"]:
            if key == "delta_m":  # (1/T) sum_t (M_t - M_t^single) / M_t^single, higher better
                values = [
                    ((m["left/acc"] - 0.5) / 0.5 + (m["right/acc"] - 0.4) / 0.4) / 2 for m in runs
                ]
            else:
                values = [m[key] for m in runs]
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (2 - 1))  # ddof = 1
            assert row["mean"][key] == pytest.approx(mean, abs=1e-12), key
            assert row["std"][key] == pytest.approx(std, abs=1e-12), key
            assert row["seeds"]["1"][key] == pytest.approx(values[1], abs=1e-12)
            if key == "delta_m":
                cells.append(f"{100 * mean:+.2f} ± {100 * std:.2f}%")
            else:
                cells.append(f"{mean:.4f} ± {std:.4f}")
            cells.append("-")  # the paper has no MultiDigits table
        assert "| " + " | ".join(cells) + " |" in text
        assert std > 0  # the seeds differ: the spread is a real one
    assert "sample standard deviation (ddof=1) over 2 seeds" in text
    assert "The paper has no table for multidigits" in text
    assert "Δm is against the single-task metrics of --reference" in text
    saved = json.loads((root / "table.json").read_text())
    assert saved["groups"][0]["rows"][1]["mean"] == group["rows"][1]["mean"]
    assert (root / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "fig2.png").stat().st_size > 5000


def test_each_printed_command_is_the_run(grid):
    """commands.txt holds one command per cell that, parsed by the entry point's own
    parser, gives the configuration the run was trained with."""
    from experiments import cli
    from experiments.datasets import DATASETS

    root = grid["root"]
    lines = (root / "commands.txt").read_text().splitlines()
    commands = [line.removeprefix("# done: ") for line in lines[1:]]
    assert len(commands) == 4 and all(line.startswith("# done: ") for line in lines[1:])
    spec = DATASETS["multidigits"]
    for command, cell in zip(commands, grid["cells"]):
        words = command.split()
        assert words[:3] == ["python", "-m", "experiments.multidigits"]
        assert f"--workdir {cell.workdir}" in command
        args = cli.make_parser(spec).parse_args(words[3:])
        config = cli.build_config(spec, args)
        summary = json.loads((cell.workdir / "summary.json").read_text())
        assert json.loads(json.dumps(config.as_dict())) == summary["config"]
        assert Path(args.workdir) == cell.workdir
    assert f"  as a command: {commands[2]}" in grid["out"]


def test_dry_run_states_and_costs_train_nothing(grid, tmp_path):
    root, dry = grid["root"], grid["dry"]
    out = grid["dry_out"]
    assert "[1/4] multidigits classifier equal seed 0: done, 2 steps" in out
    assert "[2/4] multidigits classifier equal seed 1: partial at step 1, 2 steps" in out
    assert "[3/4] multidigits classifier equal +DGR seed 0: to run, 2 steps" in out

    def rate(seed, sessions):  # from the wall times the runs recorded (those before the dry run)
        path = folder(root, "vanilla", seed) / WALL_TIME_FILE
        rows = [json.loads(line) for line in path.read_text().splitlines()][:sessions]
        return sum(r["seconds"] for r in rows) / sum(r["to_step"] - r["from_step"] for r in rows)

    first, second, third = dry["runs"][:3]
    assert first["estimate_basis"] == second["estimate_basis"] == "measured on this run"
    assert first["seconds_per_step"] == pytest.approx(rate(0, 1), rel=1e-9)
    assert second["seconds_per_step"] == pytest.approx(rate(1, 1), rel=1e-9)  # its step 1
    assert second["seconds_left"] == pytest.approx(second["seconds_per_step"] * 1)
    # no DGR run measured yet: a measured run's rate scaled by parameters (the same here)
    assert "scaled by parameters" in third["estimate_basis"]
    assert third["parameters"] == first["parameters"] > 0
    assert third["seconds_left"] == pytest.approx(2 * third["seconds_per_step"])
    assert third["seconds_per_step"] in (first["seconds_per_step"], second["seconds_per_step"])

    # a fresh workdir: every run to run, only commands.txt written
    fresh = tmp_path / "fresh"
    result, out = quietly(table.main, argv(fresh, root / "reference.json") + ["--dry_run"])
    assert [r["state"] for r in result["runs"]] == ["to run"] * 4
    assert sorted(p.name for p in fresh.iterdir()) == ["commands.txt"]
    assert "cost unknown until one run has been measured" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "3"], "--seed is set by the table itself for each run (use --seeds)"),
        (
            ["--weighting=dwa"],
            "--weighting is set by the table itself for each run (use --methods)",
        ),
        (["--resume"], "--resume is set by the table itself for each run"),
        (["--methods", "equal", "nosuch"], "argument --methods: invalid choice: 'nosuch'"),
        (["--networks", "split"], "--networks split: multidigits has classifier"),
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        table.main(["--dataset", "multidigits", "--workdir", str(tmp_path / "w"), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [errors[-1]] and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_sam_and_pta_cells_pass_their_regulariser_and_only_their_flags(tmp_path):
    """Fig. 2's cells: --regularizer sam|pta without --dgr_weight, --sam_rho to the SAM
    runs only; each printed command builds that regulariser's configuration."""
    from experiments import cli
    from experiments.datasets import DATASETS

    (tmp_path / "reference.json").write_text(json.dumps(REFERENCE))
    flags = ["--regularizers", "none", "sam", "pta", "--sam_rho", "0.1", "--dry_run"]
    quietly(table.main, argv(tmp_path) + flags)
    commands = [line for line in (tmp_path / "commands.txt").read_text().splitlines()[1:]]
    assert len(commands) == 3 * len(SEEDS)
    spec = DATASETS["multidigits"]
    seen = {}
    for command in commands:
        config = cli.build_config(spec, cli.make_parser(spec).parse_args(command.split()[3:]))
        seen[config.regularizer.name] = config
        assert not config.dgr.on
        assert ("--sam_rho 0.1" in command) == (config.regularizer.name == "sam")
    # The cell without a regulariser is the vanilla run as the README writes it:
    # --dgr_weight 0 (regularizer "dgr", off).
    assert set(seen) == {"dgr", "sam", "pta"}
    assert seen["sam"].regularizer.sam_rho == 0.1 and seen["pta"].regularizer.sam_rho == 0.05
    assert not any(p.name == "summary.json" for p in tmp_path.rglob("*"))
