"""python -m experiments.probes: the probes on features of a known structure (separable
classes, a threshold on one feature, random labels), the pooling and task choice, the
t-SNE figure of ordered classes, and the command end to end on built-in data."""

import json

import numpy as np
import pytest

from dgr_jax.tasks import NYUV2, UTKFACE
from experiments import probes


def test_linearly_separable_classes_are_read_perfectly():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10.0  # far apart against unit noise

    def sample(n):
        labels = rng.integers(0, 4, n)
        return centres[labels] + rng.normal(size=(n, 6)), labels

    accuracy = probes.fit_probes(*sample(200), *sample(100))
    assert accuracy["linear_svm"] == 1.0
    assert accuracy["knn"] == 1.0


def test_a_threshold_on_one_feature_is_found_by_the_tree():
    rng = np.random.default_rng(1)
    train = rng.uniform(size=(400, 5))
    evaluation = rng.uniform(size=(400, 5))
    evaluation = evaluation[np.abs(evaluation[:, 3] - 0.5) > 0.02]  # off the boundary
    accuracy = probes.fit_probes(train, train[:, 3] > 0.5, evaluation, evaluation[:, 3] > 0.5)
    assert accuracy["tree"] == 1.0
    # kNN reads it through four irrelevant features: clearly above chance, not perfect
    assert 0.6 < accuracy["knn"] < 1.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(600, 8)), rng.integers(0, 4, 600)
    accuracy = probes.fit_probes(x[:400], y[:400], x[400:], y[400:])
    for probe, value in accuracy.items():
        assert abs(value - 0.25) < 0.1, (probe, value)


def test_one_class_in_training_is_predicted_everywhere():
    accuracy = probes.fit_probes(np.ones((5, 2)), [3] * 5, np.zeros((4, 2)), [3, 3, 1, 3])
    assert accuracy == {p: 0.75 for p in probes.PROBES}


def test_pooling_and_the_tasks_probed():
    dense = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_allclose(probes.pooled(dense, "seg"), dense.mean(axis=(1, 2)))
    flat = np.ones((2, 7))
    np.testing.assert_array_equal(probes.pooled(flat, "age"), flat)
    np.testing.assert_allclose(  # MTAN: each task its own features
        probes.pooled({"seg": dense, "depth": 2 * dense}, "depth"), 2 * dense.mean(axis=(1, 2))
    )
    chosen, notes = probes.probed_tasks(NYUV2)
    assert chosen == [] and len(notes) == 3 and "depth (regression) is skipped" in notes[1]
    assert probes.probed_tasks(UTKFACE) == (list(UTKFACE), [])


def test_tsne_figure_of_ordered_age_bins(tmp_path):
    rng = np.random.default_rng(3)
    labels = {"age": rng.integers(0, 7, 30).tolist(), "gender": rng.integers(0, 2, 30).tolist()}
    results = [
        {
            "label": label,
            "dataset": "utkface",
            "tsne": {"points": {"shared": rng.normal(size=(30, 2)).tolist()}, "labels": labels},
        }
        for label in ("vanilla", "dgr")
    ]
    probes.plot_tsne(tmp_path / "tsne.png", results, ["age", "gender"], {"age": 7, "gender": 2})
    assert (tmp_path / "tsne.png").stat().st_size > 0
    assert probes.ORDERED_TASKS[("utkface", "age")][-1] == "60+"
    # one colour per class: classes in tab10's order, age bins along viridis in order
    from matplotlib import colormaps

    gender = probes._class_colours(2, ordered=False)
    assert gender.N == 2 and list(gender.colors) == list(colormaps["tab10"].colors[:2])
    age = probes._class_colours(7, ordered=True)
    green = [age(i)[1] for i in range(7)]  # viridis' green channel rises from 0-9 to 60+
    assert age.N == 7 and green == sorted(green) and len(set(green)) == 7


def test_command_end_to_end_on_built_in_data(tmp_path):
    argv = [
        "--workdir", str(tmp_path), "--steps", "2", "--batch_size", "16", "--base_width", "4",
        "--stage_sizes", "1,1,1,1", "--classifier_hidden", "8", "--num_dummy", "1",
        "--train_examples", "120", "--eval_examples", "60", "--tsne_examples", "40",
    ]  # fmt: skip
    payload = probes.main(argv)
    for name in ("probes.md", "probes.json", "tsne.png", "tsne_vanilla.png", "tsne_dgr.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "probes.json").read_text())
    assert saved["tasks"] == ["left", "right"] == payload["tasks"]
    assert [r["label"] for r in saved["runs"]] == ["vanilla", "dgr"]
    for run in saved["runs"]:
        assert run["examples"] == {"train": 120, "eval": 60}
        assert run["steps"] == 2
        for task in ("left", "right"):
            assert set(run["accuracy"][task]) == set(probes.PROBES)
            assert all(0.0 <= a <= 1.0 for a in run["accuracy"][task].values())
        assert len(run["tsne"]["points"]["shared"]) == 40
    text = (tmp_path / "probes.md").read_text()
    header = "| task | run | decision tree | linear SVM | kNN | majority class |"
    assert header in text
    rows = [line for line in text.splitlines() if line.startswith(("| left |", "| right |"))]
    assert len(rows) == 4 and all(line.count("|") == 7 for line in rows)
    assert "## What it shows" in text

    # --runs reads finished runs back by folder name
    again = probes.main(
        ["--workdir", str(tmp_path / "again"), "--runs", str(tmp_path / "dgr"),
         "--train_examples", "120", "--eval_examples", "60", "--tsne_examples", "0"]
    )  # fmt: skip
    assert [r["label"] for r in again["runs"]] == ["dgr"]
    assert again["runs"][0]["accuracy"] == saved["runs"][1]["accuracy"]


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        probes.main(["--runs", str(tmp_path), "--epochs", "2"])
    assert "unrecognized arguments: --epochs 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probes.main(["--neighbors", "0"])
    assert "--neighbors must be >= 1" in capsys.readouterr().err
