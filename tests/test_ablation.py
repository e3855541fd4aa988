"""python -m experiments.ablation: its fidelity numbers, the command end to end, its errors."""

import json

import jax
import numpy as np
import pytest

from dgr_jax import dgr_penalty, multitask_dummy_loss
from dgr_jax.models import ModelConfig, build_model, heads_apply_fn
from dgr_jax.objective import DGRConfig
from dgr_jax.tasks import NYUV2, task_losses
from dgr_jax.train import init_train_state
from experiments import ablation
from experiments._bench import random_batch

TINY = ModelConfig(
    network="split", backbone="resnet18", base_width=4, head_width=8, stage_sizes=(1, 1, 1, 1)
)
# One task keeps the programs small (compiling them is most of this file's time); the
# fidelity code does not depend on the number of tasks.
NORMAL = tuple(t for t in NYUV2 if t.name == "normal")


def _cosine_and_rel_err(estimate, truth):
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(estimate)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(truth)])
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    return a @ b / (norm_a * norm_b), np.linalg.norm(a - b) / norm_b


def test_fidelity_numbers_are_those_of_dgr_penalty_called_directly():
    import optax

    net = build_model(TINY, NORMAL)
    batch = random_batch(NORMAL, 2, 24, 32)
    state = jax.jit(
        lambda key: init_train_state(net, optax.sgd(0.1), key, batch["image"][:1], num_dummy=2)
    )(jax.random.PRNGKey(3))
    dgr = DGRConfig(weight=0.1, num_dummy=2)
    eps = (1e-1, 1e-3, 1e-5)
    fidelity = ablation.Fidelity(net, NORMAL, dgr, (24, 32), eps, ("float32", "float64"))
    features = np.asarray(fidelity.features(state, batch["image"]))
    targets = {t.name: batch[t.name] for t in NORMAL}
    result = fidelity.measure(state.dummy_sets, features, targets)
    assert result["reference"] == "float64"

    # Independently: dgr_penalty itself on the same inputs, each estimator (the dummy
    # sets unrolled, where the command vmaps them).
    loss_fn = multitask_dummy_loss(heads_apply_fn(net.heads, (24, 32)), task_losses(NORMAL))
    independent = {}
    for dtype in ("float64", "float32"):
        dummy, z, labels = ablation._floating((state.dummy_sets, features, targets), dtype)

        def both(z, step, dummy=dummy, labels=labels):
            def penalty(z, estimator):
                return dgr_penalty(
                    loss_fn,
                    dummy,
                    z,
                    labels,
                    estimator=estimator,
                    fd_eps=step,
                    stacked=True,
                    unroll_sets=True,
                )

            value, exact = jax.value_and_grad(penalty)(z, "exact")
            return value, exact, jax.grad(penalty)(z, "finite_difference")

        with jax.enable_x64(dtype == "float64"):
            compiled = jax.jit(both)
            independent[dtype] = {
                step: jax.device_get(compiled(z, np.dtype(dtype).type(step))) for step in eps
            }
    value, truth, _ = independent["float64"][eps[0]]
    assert result["penalty"] == pytest.approx(float(value), rel=1e-12)
    assert result["exact_grad_norm"] == pytest.approx(np.linalg.norm(truth), rel=1e-12)
    cosine, rel_err = _cosine_and_rel_err(independent["float32"][eps[0]][1], truth)
    assert result["exact"]["float32"]["cosine"] == pytest.approx(cosine, abs=1e-9)
    assert result["exact"]["float32"]["rel_err"] == pytest.approx(rel_err, rel=0.05, abs=1e-7)
    assert result["exact"]["float64"] == {"rel_err": 0.0, "cosine": pytest.approx(1.0)}
    for precision in ("float64", "float32"):
        rows = result["finite_difference"][precision]
        assert list(rows) == [repr(e) for e in eps]
        for step in eps:
            estimate = independent[precision][step][2]
            cosine, rel_err = _cosine_and_rel_err(estimate, truth)
            row = rows[repr(step)]
            # float64: the same numbers. float32: the two programs round differently, by
            # about 1e-7 of the gradient, and the quotient divides that by the step.
            close = {"rel": 1e-8} if precision == "float64" else {"abs": 1e-6 / step}
            assert row["cosine"] == pytest.approx(cosine, **close), (precision, step)
            assert row["rel_err"] == pytest.approx(rel_err, **close), (precision, step)
            norm_ratio = np.linalg.norm(estimate) / np.linalg.norm(truth)
            assert row["norm_ratio"] == pytest.approx(norm_ratio, **close), (precision, step)
    assert all(-1 <= r["cosine"] <= 1 for r in result["finite_difference"]["float32"].values())


TINY_RUN = [
    "--base_width", "4", "--head_width", "8", "--stage_sizes", "1,1,1,1",
    "--synthetic_size", "24x32", "--synthetic_counts", "2,2", "--batch_size", "2",
    "--epochs", "2", "--num_dummy", "1", "--eps", "1e-2", "1e-4", "--repeats", "1",
    "--tasks", "normal", "--cost_methods", "exact", "--precisions", "float64",
]  # fmt: skip


@pytest.mark.usefixtures("private_cache")
def test_ablation_writes_report_figures_and_json_and_a_rerun_skips_what_is_done(tmp_path, capsys):
    argv = TINY_RUN + ["--workdir", str(tmp_path), "--methods", "exact", "finite_difference"]
    first = ablation.main(argv)
    out = capsys.readouterr().out
    # The exact run in segments that end at the fidelity points, one step per epoch.
    assert "[training] exact: starting to step 1 of 2" in out
    assert "[training] exact: resuming from step 1 of 2" in out
    for epoch in (0, 1, 2):
        assert f"[fidelity] epoch {epoch} (step {epoch}):" in out
    assert "[training] finite_difference: starting of 2" in out
    for name in ("ablation.md", "ablation.json", "fidelity.png", "cost.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 500, name
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["methods"] == ["exact", "finite_difference"]
    assert set(saved["fidelity"]) == {"0", "1", "2"}
    point = saved["fidelity"]["2"]
    assert point["step"] == 2 and set(point["finite_difference"]) == {"float64"}
    assert set(point["finite_difference"]["float64"]) == {"0.01", "0.0001"}
    assert set(saved["cost"]["modes"]) == {"vanilla", "exact"}
    assert saved["cost"]["modes"]["vanilla"]["vs_vanilla"] == 1.0
    for method in ("exact", "finite_difference"):
        run = saved["training"][method]
        assert {"normal/mean_angle", "delta_m"} <= set(run["metrics"])
        assert run["penalty_by_epoch"]["1"] > 0 and run["penalty_by_epoch"]["2"] > 0
        assert [row["epoch"] for row in run["eval"]] == [1, 2]
    # The same initialisation: the first step's penalty is the same for both runs.
    rows = {
        m: json.loads((tmp_path / m / "train.jsonl").read_text().splitlines()[0])
        for m in ("exact", "finite_difference")
    }
    assert rows["exact"]["dgr/penalty"] == pytest.approx(
        rows["finite_difference"]["dgr/penalty"], rel=1e-5
    )
    # The fidelity at initialisation reads the runs' initial state and first batch.
    assert saved["fidelity"]["0"]["penalty"] == pytest.approx(
        rows["exact"]["dgr/penalty"], rel=1e-4
    )
    report = (tmp_path / "ablation.md").read_text()
    assert "## 1. Fidelity" in report and "| init |" in report and "| epoch 2 (step 2) |" in report
    assert "DGR with the exact gradient costs" in report and "![training](training.png)" in report

    stamps = {m: (tmp_path / m / "summary.json").stat().st_mtime_ns for m in rows}
    again = ablation.main(argv)
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 6  # 3 fidelity points, 2 runs, the cost table
    assert "starting" not in out and "timing" not in out
    assert {m: (tmp_path / m / "summary.json").stat().st_mtime_ns for m in rows} == stamps
    assert again["fidelity"] == first["fidelity"] and again["cost"] == first["cost"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eps", "0"], "--eps must be > 0, got 0.0"),
        (["--methods", "paper"], "--methods must include exact"),
        (["--dgr_method", "paper"], "--dgr_method is set by the ablation itself"),
        (["--num_dummy", "0"], "--num_dummy must be >= 1, got 0"),
        (["--epochs", "2", "--fidelity_epochs", "3"], "--fidelity_epochs must be in 0..2"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ],
)
def test_ablation_rejects_bad_flags_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"python -m experiments.ablation: error: {err.split('error: ', 1)[1].strip()}"
    ]
