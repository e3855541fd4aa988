"""Entry points' dry runs and the benchmark commands, at sizes that run in seconds."""

import json

import pytest

from experiments import (
    cityscapes,
    method_benchmark,
    nyuv2,
    penalty_benchmark,
    step_benchmark,
    utkface,
)

# Full-size counts derived by hand from the PyTorch layer shapes (see test_models.py for
# the formulas): ResNet-50 trunk; DeepLabHead(2048, c) = 16,125,440 + 257 c; MTAN adds
# 4,175,936 of attention per task and 7,931,392 of shared blocks; UTKFace heads
# 2048-64-c.
SCENE_HEAD = 16_125_440
RESNET50 = 23_508_032


@pytest.mark.parametrize(
    "entry, argv, encoder, heads",
    [
        (nyuv2, ["--network", "split"], RESNET50, 3 * SCENE_HEAD + 257 * 17),
        (
            nyuv2,
            ["--network", "mtan"],
            RESNET50 + 3 * 4_175_936 + 7_931_392,
            3 * SCENE_HEAD + 257 * 17,
        ),
        (cityscapes, ["--network", "split"], RESNET50, 3 * SCENE_HEAD + 257 * 30),
        (
            cityscapes,
            ["--network", "mtan"],
            RESNET50 + 3 * 4_175_936 + 7_931_392,
            3 * SCENE_HEAD + 257 * 30,
        ),
        (utkface, [], RESNET50, 3 * (2048 * 64 + 64) + 65 * 14),
    ],
)
def test_dry_run_prints_full_size_counts(capsys, entry, argv, encoder, heads):
    entry.main(argv + ["--dry_run"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    counts = json.loads(last)
    assert counts == {
        "encoder_params": encoder,
        "head_params": heads,
        "dummy_params": 3 * heads,
        "total_params": encoder + 4 * heads,
    }


def test_entry_points_reject_what_they_cannot_do(capsys):
    with pytest.raises(
        SystemExit, match="no data: pass --data_dir DIR with the NYUv2 .npy folders"
    ):
        nyuv2.main([])
    with pytest.raises(SystemExit) as exit_info:
        utkface.main(["--network", "mtan", "--dry_run"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mtan'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--num_dummy must be >= 1, got 0"):
        nyuv2.main(["--num_dummy", "0", "--dry_run"])


SMALL = [
    "--height",
    "32",
    "--width",
    "40",
    "--backbone",
    "18",
    "--base_width",
    "4",
    "--head_width",
    "8",
    "--repeats",
    "1",
]


def test_penalty_benchmark_writes_its_table_as_json(tmp_path):
    path = tmp_path / "penalty.json"
    penalty_benchmark.main(SMALL + ["--json", str(path)])
    result = json.loads(path.read_text())
    assert set(result["methods"]) == {"exact", "double_backprop", "finite_difference"}
    for figures in result["methods"].values():
        assert {"median_s", "compile_s", "rel_err"} <= set(figures) and figures["median_s"] > 0
    assert result["methods"]["exact"]["rel_err"] < 1e-4
    # float32 against the float64 truth: the L1 normal loss (the original's) leaves the
    # penalty gradient of this tiny random network 2e-3 off in float32 (the cosine loss 4e-5),
    # double_backprop as much as exact.
    assert result["methods"]["exact"]["rel_err_vs_float64"] < 1e-2
    assert (
        result["methods"]["exact"]["rel_err_vs_float64"]
        < 2 * result["methods"]["double_backprop"]["rel_err_vs_float64"] + 1e-4
    )


def test_step_benchmark_runs_modes_in_their_own_processes(tmp_path):
    # Every mode's step is tested in-process in test_train.py; here the command itself.
    path = tmp_path / "step.json"
    step_benchmark.main(
        SMALL + ["--num_dummy", "1", "--modes", "vanilla", "dgr_exact", "--json", str(path)]
    )
    result = json.loads(path.read_text())
    assert set(result["modes"]) == {"vanilla", "dgr_exact"}
    assert set(result["ratios"]) == {"dgr_exact/vanilla"}
    for figures in result["modes"].values():
        assert figures["median_s"] > 0 and figures["compile_s"] > 0 and figures["peak_rss_mb"] > 0
    assert result["config"]["num_dummy"] == 1 and "cpu" in result["device"]


@pytest.mark.parametrize(
    "entry, argv, message",
    [
        (penalty_benchmark, ["--height", "0"], "--height must be >= 1, got 0"),
        (step_benchmark, ["--fd_eps", "0"], "--fd_eps must be > 0, got 0.0"),
        (step_benchmark, ["--num_dummy", "0"], "--num_dummy must be >= 1, got 0"),
        (step_benchmark, ["--dgr_weight", "-1"], "--dgr_weight must be >= 0, got -1.0"),
    ],
)
def test_benchmarks_reject_bad_flags_in_one_line(capsys, entry, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_method_benchmark_reports_every_configuration_against_equal(tmp_path):
    path = tmp_path / "methods.json"
    method_benchmark.main(
        SMALL + ["--num_dummy", "1", "--methods", "graddrop", "--no_dgr", "--json", str(path)]
    )
    result = json.loads(path.read_text())
    assert set(result["methods"]) == {"equal", "graddrop"} and result["methods_dgr"] == {}
    equal, graddrop = result["methods"]["equal"], result["methods"]["graddrop"]
    assert equal["ratio_to_vanilla"] == 1.0
    ratio = graddrop["median_s"] / equal["median_s"]
    assert abs(graddrop["ratio_to_vanilla"] - ratio) < 1e-12
    assert graddrop["combine_s"] > 0 and "combine_s" not in equal
    assert graddrop["solver_s"] > 0 and "solver_s" not in equal
    assert abs(graddrop["solver_share"] - graddrop["solver_s"] / graddrop["median_s"]) < 1e-12


@pytest.mark.usefixtures("private_cache")
def test_table4a_sweep_writes_the_table_and_resumes(tmp_path, capsys):
    from experiments import table4a

    argv = ["--datasets", "nyuv2", "--num_tasks", "1", "--num_dummy", "0", "1", "--synthetic"]
    argv += ["--small", "--workdir", str(tmp_path), "--synthetic_counts", "4,2", "--epochs", "1"]
    first = table4a.main(argv)
    out = capsys.readouterr().out
    assert "[1/2] nyuv2 single_seg: --synthetic --tasks seg --dgr_weight 0" in out
    assert "[2/2] nyuv2 tasks1_dummy1:" in out and "--num_dummy 1" in out
    assert first["delta_m"]["nyuv2"]["1"]["0"] == 0.0  # the single-task run is its own reference
    seg = first["runs"]["nyuv2/tasks1_dummy1"]["seg/miou"]
    reference = first["runs"]["nyuv2/single_seg"]["seg/miou"]
    assert abs(first["delta_m"]["nyuv2"]["1"]["1"] - (seg - reference) / reference) < 1e-12
    table = (tmp_path / "table4a.md").read_text()
    assert "| nyuv2 (1), paper | +0.00% | +0.05% |" in table
    again = table4a.main(argv)  # everything done: skipped, same table
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert again == first
    with pytest.raises(SystemExit):
        table4a.main(["--synthetic", "--tasks", "seg"])
    assert "--tasks is set by the sweep itself" in capsys.readouterr().err
