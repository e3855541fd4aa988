"""SAM and PTA (dgr_jax.regularizers, dgr_jax.pta) and the --regularizer flag.

SAM: the step applies the gradient taken at the ascent point, against a brute-force
float64 computation of the MTL method's gradient at ``w`` and at ``w + rho g/||g||``.
PTA: each task's loss is the mean of its decoders' losses computed decoder by decoder
with the plain heads; decoders start distinct, all train, stay distinct; inference
predicts with the decoder of lowest running loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dgr_jax import pta, regularizers
from dgr_jax.methods import get_method
from dgr_jax.models import ModelConfig, build_model
from dgr_jax.objective import DGRConfig
from dgr_jax.tasks import MULTIDIGITS
from dgr_jax.train import init_train_state, make_train_step
from experiments._bench import random_batch

TINY = ModelConfig(
    network="classifier",
    backbone="resnet18",
    base_width=4,
    stage_sizes=(1, 1, 1, 1),
    classifier_hidden=8,
)


def as64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        tree,
    )


@pytest.fixture(scope="module")
def problem():
    net = build_model(TINY, MULTIDIGITS)
    batch = as64({k: jnp.asarray(v) for k, v in random_batch(MULTIDIGITS, 8, 12, 24).items()})
    return net, batch


def _state(net, batch, method, optimizer, seed=0):
    init = jax.jit(
        lambda key: init_train_state(net, optimizer, key, batch["image"][:1], 1, method, 2)
    )
    return as64(init(jax.random.PRNGKey(seed)))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


# ----------------------------------------------------------------------------- SAM


def _brute_force(net, batch, batch_stats, method_name):
    """The MTL method's gradient of the model at ``w``, written from its definition: equal,
    the gradient of l_1 + l_2; pcgrad (two tasks, so one order), each task's encoder
    gradient projected off the other's when they conflict, summed; the heads get their
    own task's gradient. Also the task losses and the new BatchNorm statistics at ``w``."""

    @jax.jit
    def losses(model_params):
        (_, outputs), updates = net.apply(
            {"params": model_params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        per_task = jnp.stack(
            [
                optax.softmax_cross_entropy_with_integer_labels(
                    outputs[t.name], batch[t.name]
                ).mean()
                for t in MULTIDIGITS
            ]
        )
        return per_task, updates["batch_stats"]

    @jax.jit
    def gradient(model_params):
        jac = jax.jacrev(lambda p: losses(p)[0])(model_params)  # leaves (T, ...)
        heads = jax.tree_util.tree_map(lambda g: g.sum(0), jac["heads"])
        _, unravel = ravel_pytree(model_params["encoder"])
        g1, g2 = (
            ravel_pytree(jax.tree_util.tree_map(lambda g, i=i: g[i], jac["encoder"]))[0]
            for i in (0, 1)
        )
        if method_name == "pcgrad":
            conflict = g1 @ g2 < 0
            g1, g2 = (
                jnp.where(conflict, g1 - (g1 @ g2) / (g2 @ g2) * g2, g1),
                jnp.where(conflict, g2 - (g1 @ g2) / (g1 @ g1) * g1, g2),
            )
        return {"encoder": unravel(g1 + g2), "heads": heads}

    return losses, gradient


@pytest.mark.parametrize("method_name", ["equal", "pcgrad"])
def test_sam_applies_the_gradient_at_the_ascent_point(problem, method_name):
    net, batch = problem
    rho = 0.5  # large enough for the ascent point's gradient to differ clearly from w's
    method = get_method(method_name)
    state = _state(net, batch, method, optax.sgd(1.0))
    step = jax.jit(
        make_train_step(
            net, MULTIDIGITS, DGRConfig(), optax.sgd(1.0), method, regularizer=regularizers.sam(rho)
        )
    )
    new_state, metrics = step(state, batch)
    w = {"encoder": state.params["encoder"], "heads": state.params["heads"]}
    applied = jax.tree_util.tree_map(
        lambda a, b: a - b, w, {k: new_state.params[k] for k in ("encoder", "heads")}
    )

    losses, gradient = _brute_force(net, batch, state.batch_stats, method_name)
    g = gradient(w)
    norm = np.linalg.norm(_flat(g))
    ascent = jax.tree_util.tree_map(lambda p, d: p + rho * d / norm, w, g)
    expected = gradient(ascent)
    err = np.linalg.norm(_flat(applied) - _flat(expected)) / np.linalg.norm(_flat(expected))
    assert err < 1e-9, err
    # Not the gradient at w: the test would see a step that ignores the ascent point.
    assert np.linalg.norm(_flat(applied) - _flat(g)) > 1e-3 * norm
    assert abs(float(metrics["sam/grad_norm"]) - norm) < 1e-9 * norm
    # Losses and BatchNorm statistics are those of the pass at w.
    per_task, stats_at_w = losses(w)
    np.testing.assert_allclose(
        [float(metrics[f"loss/{t.name}"]) for t in MULTIDIGITS], per_task, rtol=1e-12
    )
    np.testing.assert_allclose(_flat(new_state.batch_stats), _flat(stats_at_w), rtol=1e-12)


# ----------------------------------------------------------------------------- PTA


def _decoder(heads_params, d):
    return jax.tree_util.tree_map(lambda a: a[d], heads_params)


def test_pta_loss_is_the_mean_over_decoders_which_train_and_stay_distinct(problem):
    base, batch = problem
    decoders = 3
    net = regularizers.pta(decoders).network(base)
    assert pta.num_decoders(net) == decoders
    optimizer = optax.sgd(0.5)
    state = _state(net, batch, get_method("equal"), optimizer)
    heads = state.params["heads"]
    # One subtree per task (the step's contract), each leaf stacked over the decoders.
    assert set(heads) == {t.name for t in MULTIDIGITS}
    assert {x.shape[0] for x in jax.tree_util.tree_leaves(heads)} == {decoders}
    # DGR's dummy sets stay copies of one head per task.
    assert _flat(state.dummy_sets).size == _flat(_decoder(heads, 0)).size

    new_state, metrics = jax.jit(
        make_train_step(net, MULTIDIGITS, DGRConfig(), optimizer, get_method("equal"))
    )(state, batch)

    # By hand: the encoder's features, each decoder through the plain heads, its loss.
    features, _ = base.encoder.apply(
        {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    by_hand = np.array(
        [
            [
                optax.softmax_cross_entropy_with_integer_labels(
                    base.heads.apply({"params": _decoder(heads, d)}, features)[t.name],
                    batch[t.name],
                ).mean()
                for d in range(decoders)
            ]
            for t in MULTIDIGITS
        ]
    )
    for i, t in enumerate(MULTIDIGITS):
        assert abs(float(metrics[f"loss/{t.name}"]) - by_hand[i].mean()) < 1e-12
    # The running decoder losses start from 0: one step leaves (1 - m) times the losses.
    running = new_state.batch_stats["heads"]["pta_decoder_loss"]
    for i, t in enumerate(MULTIDIGITS):
        np.testing.assert_allclose(
            running[t.name], (1 - pta.SELECTION_MOMENTUM) * by_hand[i], rtol=1e-6
        )
        assert int(metrics[f"pta/decoder/{t.name}"]) == int(np.argmin(by_hand[i]))

    for d in range(decoders):
        before, after = _flat(_decoder(heads, d)), _flat(_decoder(new_state.params["heads"], d))
        assert np.linalg.norm(after - before) > 1e-3 * np.linalg.norm(before), d  # trained
        for e in range(d):  # distinct before and after
            for tree in (heads, new_state.params["heads"]):
                a, b = _flat(_decoder(tree, d)), _flat(_decoder(tree, e))
                assert np.linalg.norm(a - b) > 0.1 * np.linalg.norm(a), (d, e)

    # Inference: each task predicts with its decoder of lowest running loss.
    chosen = {"left": 2, "right": 0}
    stats = {
        **new_state.batch_stats,
        "heads": {
            "pta_decoder_loss": {
                name: jnp.asarray(np.where(np.arange(decoders) == d, 0.5, 1.0))
                for name, d in chosen.items()
            }
        },
    }
    model_params = {k: new_state.params[k] for k in ("encoder", "heads")}
    variables = {"params": model_params, "batch_stats": stats}
    features, outputs = net.apply(variables, batch["image"], train=False)
    for name, d in chosen.items():
        single = base.heads.apply({"params": _decoder(new_state.params["heads"], d)}, features)
        np.testing.assert_allclose(outputs[name], single[name], rtol=1e-12)


def test_pta_refuses_dgr(problem):
    net = regularizers.pta(2).network(problem[0])
    with pytest.raises(ValueError, match="PTA"):
        make_train_step(net, MULTIDIGITS, DGRConfig(weight=0.1), optax.sgd(0.1))


# ------------------------------------------------------ one step with several methods


@pytest.mark.parametrize(
    "regularizer, method_name",
    # SAM with equal and pcgrad, PTA with equal: above. dwa keeps the pass at w's losses;
    # autol looks ahead (under SAM, from each pass's point); pcgrad takes PTA's per-task
    # gradients of all of a task's decoders.
    [("sam", "dwa"), ("sam", "autol"), ("pta", "pcgrad")],
)
def test_one_step_with_mtl_methods(problem, regularizer, method_name):
    base, batch = problem
    reg = regularizers.sam() if regularizer == "sam" else regularizers.pta(2)
    net = reg.network(base)
    method = get_method(method_name)
    batch = {**batch, **{f"heldout/{k}": v[::-1] for k, v in batch.items()}}  # for autol
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = _state(net, batch, method, optimizer)
    new_state, metrics = jax.jit(
        make_train_step(net, MULTIDIGITS, DGRConfig(), optimizer, method, regularizer=reg)
    )(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for name in ("encoder", "heads"):
        assert np.linalg.norm(_flat(new_state.params[name]) - _flat(state.params[name])) > 0


# ----------------------------------------------------------------------------- flags


def _config(*argv):
    from experiments.cli import build_config, make_parser
    from experiments.datasets import DATASETS

    spec = DATASETS["nyuv2"]
    return build_config(spec, make_parser(spec).parse_args(["--synthetic", *argv]))


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _config(*argv)
    return str(exit_info.value.code)


def test_regularizer_flag_sets_the_record_and_dgr():
    config = _config()  # dgr, the default: the preset's lambda stands
    assert config.regularizer.name == "dgr" and config.dgr.weight == 0.1
    assert _config("--dgr_weight", "0.3").dgr.weight == 0.3
    for name in ("none", "sam", "pta"):
        config = _config("--regularizer", name)
        assert config.regularizer.name == name and not config.dgr.on, name
    config = _config("--regularizer", "sam", "--sam_rho", "0.1")
    assert config.regularizer.sam_rho == 0.1
    assert _config("--regularizer", "sam").regularizer.sam_rho == 0.05
    assert _config("--regularizer", "pta", "--pta_decoders", "3").regularizer.pta_decoders == 3
    saved = config.as_dict()
    assert saved["regularizer"] == {"name": "sam", "sam_rho": 0.1, "pta_decoders": 4}


def test_regularizer_flag_errors(capsys):
    for name in ("none", "sam", "pta"):
        message = _error(capsys, "--regularizer", name, "--dgr_weight", "0")
        assert "--dgr_weight applies to --regularizer dgr only" in message, message
        assert "\n" not in message
    assert "--sam_rho applies to --regularizer sam only" in _error(capsys, "--sam_rho", "0.1")
    message = _error(capsys, "--regularizer", "sam", "--pta_decoders", "2")
    assert "--pta_decoders applies to --regularizer pta only" in message
    assert "--sam_rho must be > 0" in _error(capsys, "--regularizer", "sam", "--sam_rho", "0")
    message = _error(capsys, "--regularizer", "pta", "--pta_decoders", "0")
    assert "--pta_decoders must be >= 1" in message
    with pytest.raises(SystemExit):  # argparse's own choice check
        _config("--regularizer", "dropout")


def test_run_config_refuses_dgr_under_another_regularizer():
    from dgr_jax.errors import ConfigError
    from experiments.config import RegularizerConfig, RunConfig

    with pytest.raises(ConfigError) as error:
        RunConfig(regularizer=RegularizerConfig("sam"), dgr=DGRConfig(weight=0.1))
    assert (error.value.owner, error.value.field) == ("DGRConfig", "weight")


def test_resume_checks_the_regularizer():
    from experiments.config import RegularizerConfig, RunConfig
    from experiments.loop import RunError, check_resumable

    class Saved:
        directory = "ckpt"

        def __init__(self, config):
            self.config = config

        def steps(self):
            return [1]

        def read_position(self, step):
            return {"config": self.config}

    config = RunConfig()
    older = {k: v for k, v in config.as_dict().items() if k != "regularizer"}
    check_resumable(Saved(older), config)  # a run saved before the field had its default
    sam = RunConfig(regularizer=RegularizerConfig("sam")).as_dict()
    with pytest.raises(RunError, match="--regularizer 'sam'"):
        check_resumable(Saved(sam), config)


@pytest.mark.parametrize("name, label", [("sam", "Vanilla + SAM"), ("pta", "Vanilla + PTA")])
def test_results_table_names_the_regularizer_and_shows_no_paper_row(name, label):
    from experiments.config import RegularizerConfig, RunConfig
    from experiments.reporting import results_table

    config = RunConfig(dataset="multidigits", model=ModelConfig(network="classifier"))
    config = config.replace(regularizer=RegularizerConfig(name=name))
    values = {"left/acc": 0.5, "right/acc": 0.75, "delta_m": -0.25}
    table = results_table(config, config.task_records(), values, values).splitlines()
    assert table[2].startswith(f"| this run: {label} (paper's convention) |")
    assert table[3] == f"| this run: {label} (whole-set) | 0.5000 | 0.7500 | -25.00% |"
    assert table[4] == ""  # the paper prints Fig. 2's SAM and PTA as bars, not table rows
