"""python -m experiments.universality: its estimators against hand computations (a linear
head's cross-entropy gradient in closed form, its minimum from scikit-learn's logistic
regression, DeepLabV3 heads against the train step's DGR penalty), the end-to-end command
on built-in data at a tiny size, and RunConfig.from_dict (how it reads runs back)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgr_jax import heads_penalty, init_dummy_sets
from dgr_jax.models import ClassifierHeads, DenseHeads, ModelConfig, heads_apply_fn
from dgr_jax.objective import DGRConfig
from dgr_jax.tasks import NYUV2, Task, task_losses
from experiments import universality
from experiments.config import DataConfig, MethodConfig, RunConfig, TaskConfig, TrainConfig

TASKS = (Task("a", 3, "classification"), Task("b", 2, "classification"))


def _linear_problem(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d))
    targets = {t.name: rng.integers(0, t.channels, n).astype(np.int32) for t in TASKS}
    heads = ClassifierHeads(tuple((t.name, t.channels) for t in TASKS), hidden=0)
    return heads, features, targets


def _softmax_loss_and_grad(z, w, b, y):
    """Mean cross-entropy of softmax(z w + b) and its gradient, in numpy float64."""
    logits = z @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(w.shape[1])[y]
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    residual = (p - onehot) / len(y)
    return loss, z.T @ residual, residual.sum(axis=0)


def test_loss_and_gradient_norm_of_a_linear_head_in_closed_form():
    heads, features, targets = _linear_problem()
    with jax.enable_x64(True):
        params = heads.init(jax.random.PRNGKey(1), jnp.asarray(features))["params"]
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        measure = universality.make_measure(heads_apply_fn(heads, None), TASKS)
        result = jax.device_get(measure(params, jnp.asarray(features), targets))
    squares = 0.0
    for task in TASKS:
        fc = params[task.name]["fc"]
        loss, grad_w, grad_b = _softmax_loss_and_grad(
            features, np.asarray(fc["kernel"]), np.asarray(fc["bias"]), targets[task.name]
        )
        norm = np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2))
        np.testing.assert_allclose(result[task.name][0], loss, rtol=1e-10)
        np.testing.assert_allclose(result[task.name][1], norm, rtol=1e-8)
        squares += norm**2
    # DGR's dummy loss is the sum; its heads are disjoint, so the norms add in squares
    np.testing.assert_allclose(result["all"][1], np.sqrt(squares), rtol=1e-8)


def test_fitted_loss_is_the_minimum_of_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    heads, features, targets = _linear_problem(n=60, seed=3)  # random labels: not separable
    with jax.enable_x64(True):
        z = jnp.asarray(features)
        params = heads.init(jax.random.PRNGKey(0), z)["params"]
        params = jax.tree_util.tree_map(lambda x: 3.0 * x, params)  # start far from it
        fitted, fit = universality.fit_heads(
            heads_apply_fn(heads, None),
            TASKS,
            params,
            z,
            targets,
            lr=0.05,
            max_steps=4000,
            check_every=100,
            tol=1e-7,
        )
        after = universality.make_measure(heads_apply_fn(heads, None), TASKS)(fitted, z, targets)
    for task in TASKS:
        model = LogisticRegression(C=1e10, tol=1e-12, max_iter=10000).fit(
            features, targets[task.name]
        )
        minimum = log_loss(targets[task.name], model.predict_proba(features))
        assert fit[task.name]["converged"], fit[task.name]
        assert fit[task.name]["losses"][0] > minimum + 0.05  # the fit had something to do
        np.testing.assert_allclose(fit[task.name]["losses"][-1], minimum, atol=1e-4)
        np.testing.assert_allclose(float(after[task.name][0]), minimum, atol=1e-4)
        assert float(after[task.name][1]) < 1e-2  # a minimum: the gradient is gone


def test_dense_heads_norms_match_the_train_steps_penalty():
    """On DeepLabV3 heads (BatchNorm on the set's statistics) the dummy-loss norm is DGR's
    penalty of one set (heads_penalty, as the train step calls it), and the per-task norms
    add up to it in squares; the mean over K sets of a draw is that of the K penalties."""
    tasks = (NYUV2[0], NYUV2[2])  # segmentation and normals: two kinds, two heads
    heads = DenseHeads(
        tuple((t.name, t.channels) for t in tasks),
        tuple((t.name, t.record.activation) for t in tasks if t.record.activation),
        width=4,
        rates=(2,),
    )
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32)
    size = (8, 10)
    targets = {
        "seg": rng.integers(-1, 13, (3, *size)).astype(np.int32),
        "normal": rng.normal(size=(3, *size, 3)).astype(np.float32),
    }
    sets = init_dummy_sets(heads, jax.random.PRNGKey(2), 2, features, size, train=False)
    apply_heads = heads_apply_fn(heads, size)
    measure = universality.make_measure(apply_heads, tasks)
    stats = universality.random_head_statistics(
        measure, [sets], features, targets, {t: 0.0 for t in ["seg", "normal", "all"]}
    )
    penalty_of = jax.jit(
        lambda one: heads_penalty(apply_heads, one, features, targets, task_losses(tasks))
    )
    per_set = []
    for k in range(2):
        one = jax.tree_util.tree_map(lambda x, k=k: x[k : k + 1], sets)
        penalty = penalty_of(one)
        result = jax.device_get(
            measure(jax.tree_util.tree_map(lambda x: x[0], one), features, targets)
        )
        np.testing.assert_allclose(result["all"][1], penalty, rtol=1e-5)
        squares = sum(result[t.name][1] ** 2 for t in tasks)
        np.testing.assert_allclose(result["all"][1], np.sqrt(squares), rtol=1e-5)
        per_set.append(result)
    np.testing.assert_allclose(
        stats["all"]["grad_norm_mean"], np.mean([r["all"][1] for r in per_set]), rtol=1e-6
    )
    np.testing.assert_allclose(
        stats["seg"]["gap_mean"], np.mean([r["seg"][0] for r in per_set]), rtol=1e-6
    )


def test_run_config_round_trips_through_its_dict():
    config = RunConfig(
        dataset="nyuv2",
        model=ModelConfig(backbone="resnet18", stage_sizes=(1, 2, 1, 1), head_width=8),
        dgr=DGRConfig(weight=0.1, num_dummy=2, squared=True),
        method=MethodConfig("dwa", (("temperature", 3.0),)),
        train=TrainConfig(epochs=3, seed=4),
        data=DataConfig(synthetic=True, synthetic_size=(24, 32), synthetic_counts=(8, 4)),
        tasks=TaskConfig(names=("seg", "depth")),
        reference={"seg/miou": 0.4},
    )
    saved = json.loads(json.dumps(config.as_dict()))  # as summary.json holds it
    assert RunConfig.from_dict(saved) == config
    assert RunConfig.from_dict({}) == RunConfig()
    with pytest.raises(ValueError, match="nonsense"):
        RunConfig.from_dict({**saved, "model": {**saved["model"], "nonsense": 1}})


TINY = [
    "--dataset", "multidigits", "--steps", "2", "--batch_size", "16", "--base_width", "4",
    "--stage_sizes", "1,1,1,1", "--classifier_hidden", "8", "--num_dummy", "1",
    "--train_examples", "48", "--eval_examples", "32", "--draws", "2", "--num_heads", "2",
    "--fit_steps", "30", "--fit_check", "10",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_command(tmp_path_factory):
    """The command once on the tiny runs, in both encoder modes: ``(workdir, payload)``."""
    workdir = tmp_path_factory.mktemp("universality")
    return workdir, universality.main(["--workdir", str(workdir), *TINY, "--encoder_mode", "both"])


def test_command_end_to_end_on_built_in_data(tiny_command):
    tmp_path, payload = tiny_command
    for name in ("universality.md", "universality.json", "universality.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "universality.json").read_text())
    assert saved["tasks"] == ["left", "right"] == payload["tasks"]
    assert [r["label"] for r in saved["runs"]] == ["vanilla", "dgr"]
    assert saved["settings"]["draws"] == 2 and saved["settings"]["fit_optimizer"] == "adam"
    for run in saved["runs"]:
        assert run["examples"] == {"train": 48, "eval": 32}
        for split in ("train", "eval"):
            for task in ("left", "right", "all"):
                row = run["splits"][split][task]
                assert len(row["per_draw"]) == 2
                assert row["gap_mean"] == pytest.approx(row["loss_mean"] - row["fitted_loss"])
                assert row["grad_norm_mean"] > 0 and row["grad_norm_std"] >= 0
        for split in ("train", "eval"):  # each set fitted apart, from the run's heads
            for task in ("left", "right"):
                fit = run["fit"][split][task]
                assert len(fit["losses"]) >= 2 and fit["losses"][-1] < fit["losses"][0]
                row = run["splits"][split][task]
                assert row["fitted_loss"] == pytest.approx(fit["losses"][-1])
                assert row["trained_head_loss"] == pytest.approx(fit["losses"][0])
    text = (tmp_path / "universality.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| left |")]
    assert len(rows) == 8  # two runs, two splits, two encoder modes
    assert "## What it shows" in text and "sampling error" in text

    # a finished run trained with other flags is refused, not reused
    with pytest.raises(SystemExit, match="holds a finished run"):
        universality.main(["--workdir", str(tmp_path), *TINY, "--seed", "1"])


def test_train_mode_features_are_the_train_steps(tiny_command):
    """--encoder_mode both: the default's (train) tables first, inference's beside them.
    Training-mode features with the DGR run's dummy sets give the penalty its train step
    logged at step 1 (initial state, first batch), inference-mode ones do not; chunks of
    the run's batch size are its batches; the state's statistics are left as they were."""
    from experiments.runs import FrozenFeatures, RunSetup

    tmp_path, payload = tiny_command
    assert payload["settings"]["encoder_mode"] == "both"
    assert [r["encoder_mode"] for r in payload["runs"]] == ["train", "train"]
    other = payload["other_modes"]["inference"]
    assert [r["label"] for r in other] == ["vanilla", "dgr"]
    for run_train, run_inference in zip(payload["runs"], other):  # same sets, other features
        a, b = run_train["splits"]["eval"]["all"], run_inference["splits"]["eval"]["all"]
        assert a["grad_norm_mean"] != pytest.approx(b["grad_norm_mean"], rel=1e-3)
    text = (tmp_path / "universality.md").read_text()
    assert (
        "## Encoder mode" in text and "chunks of the run's batch size (vanilla 16, dgr 16)" in text
    )
    assert "## inference mode: evaluation set" in text

    config = RunConfig.from_dict(
        json.loads((tmp_path / "dgr" / "summary.json").read_text())["config"]
    )
    setup = RunSetup(config)
    state = setup.initial_state()
    logged = json.loads((tmp_path / "dgr" / "train.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    images, targets = setup.batch["image"], {t.name: setup.batch[t.name] for t in setup.tasks}
    apply_heads = heads_apply_fn(setup.net.heads, setup.image_size)

    def penalty(mode):
        features = FrozenFeatures(setup.net, mode)(state, images)
        return float(
            heads_penalty(
                apply_heads, state.dummy_sets, features, targets, task_losses(setup.tasks)
            )
        )

    np.testing.assert_allclose(penalty("train"), logged["dgr/penalty"], rtol=1e-4)
    assert abs(penalty("inference") - logged["dgr/penalty"]) > 1e-2 * logged["dgr/penalty"]

    before = jax.device_get(state.batch_stats)
    epoch = list(setup.data.train_epoch(0, 0))[:3]
    frozen = FrozenFeatures(setup.net, "train", batch_size=config.train.batch_size)
    chunked, _ = frozen.collect(state, epoch, ["left"], max_examples=40)  # 16, 16, 8
    as_batches, _ = FrozenFeatures(setup.net, "train").collect(state, epoch, ["left"], 40)
    np.testing.assert_allclose(chunked, as_batches, rtol=1e-5, atol=1e-6)
    halves, _ = FrozenFeatures(setup.net, "train", batch_size=8).collect(state, epoch, ["left"], 40)
    assert not np.allclose(halves[:16], chunked[:16], rtol=1e-3)  # the batch matters
    np.testing.assert_allclose(halves[32:], chunked[32:], rtol=1e-5, atol=1e-6)  # same last 8
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(state.batch_stats))
    with pytest.raises(ValueError, match="encoder mode"):
        FrozenFeatures(setup.net, "eval")


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        universality.main(["--runs", str(tmp_path / "missing")])
    assert "--runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        universality.main(["--draws", "1"])
    assert "--draws must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        universality.main(["--workdir", str(tmp_path), "--resume"])
    assert "--resume is set by" in capsys.readouterr().err
