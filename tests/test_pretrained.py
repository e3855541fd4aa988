"""ImageNet-pretrained trunks: a state dict in torchvision's exact key layout, with
random values, loads into our encoder and gives PyTorch's forward (eval and train mode,
running statistics included); every bad checkpoint fails in one line."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dgr_jax.models import BACKBONES, BatchNorm, ModelConfig, build_model  # noqa: E402
from dgr_jax.models.pretrained import encoder_from_torch, with_pretrained_encoder  # noqa: E402
from dgr_jax.tasks import NYUV2  # noqa: E402
from tests.torch_reference import ResNet, randomise  # noqa: E402


def state_dict_of(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "depth, base_width, stage_sizes, dilated",
    [
        (50, 64, None, True),  # the real dilated ResNet-50: every torchvision key
        (50, 8, (1, 2, 2, 2), False),
        (18, 8, (2, 1, 2, 2), True),
    ],
)
def test_torchvision_resnet_loads_and_matches_torch_in_eval_and_train_mode(
    depth, base_width, stage_sizes, dilated, report
):
    torch_model = randomise(ResNet(depth, base_width, stage_sizes, dilated))
    config = ModelConfig(
        network="split",
        backbone=f"resnet{depth}",
        dilated=dilated,
        base_width=base_width,
        stage_sizes=stage_sizes,
    )
    loaded = encoder_from_torch(state_dict_of(torch_model), config)
    trunk = BACKBONES[config.backbone](config, BatchNorm)
    x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)

    def torch_forward(model, x, train, dtype):
        model = copy.deepcopy(model).to(dtype).train(train)
        with torch.no_grad():
            out = nhwc(model.trunk(nchw(x).to(dtype)))
        stats = encoder_from_torch(state_dict_of(model.float()), config)["batch_stats"]
        return out, stats

    def ours(train, dtype):
        variables = jax.tree_util.tree_map(lambda a: a.astype(dtype), loaded)
        out, updates = (
            trunk.apply(variables, jnp.asarray(x, dtype), train=True, mutable=["batch_stats"])
            if train
            else (trunk.apply(variables, jnp.asarray(x, dtype), train=False), None)
        )
        return out, updates and updates["batch_stats"]

    for train in (False, True):
        exact, exact_stats = torch_forward(torch_model, x, train, torch.float64)
        # float64 on both sides: the same function, to rounding.
        out64, stats64 = ours(train, jnp.float64)
        assert out64.shape == exact.shape
        assert rel_err(out64, exact) < 1e-10
        if train:  # the updated running statistics, PyTorch's unbiased variance included
            # (read back through the float32 mapping: float32's rounding)
            errors = jax.tree_util.tree_map(rel_err, stats64, exact_stats)
            assert max(jax.tree_util.tree_leaves(errors)) < 1e-7
        # float32: 1e-5 of PyTorch's float32 in eval mode. In train mode a deep trunk
        # normalises every layer by its batch's statistics and float32 itself is further
        # from the exact function than that (torch's own float32 is ~5e-5 off on the
        # dilated ResNet-50), so there: no further from exact than PyTorch's float32 is.
        torch32, _ = torch_forward(torch_model, x, train, torch.float32)
        out32, _ = ours(train, jnp.float32)
        if base_width == 64:
            report(
                f"resnet50 (dilated) vs torch, {'train' if train else 'eval'} mode: float64 "
                f"{rel_err(out64, exact):.1e}; float32 {rel_err(out32, torch32):.1e} from torch's "
                f"float32, {rel_err(out32, exact):.1e} from float64 (torch's float32: "
                f"{rel_err(torch32, exact):.1e})"
            )
        if train:
            assert rel_err(out32, exact) < max(1.5 * rel_err(torch32, exact), 1e-5)
        else:
            assert rel_err(out32, torch32) < 1e-5


def test_pretrained_trunk_drops_into_split_and_mtan_variables():
    torch_model = randomise(ResNet(50, 8, (1, 2, 1, 1), dilated=True))
    weights = state_dict_of(torch_model)
    for network in ("split", "mtan"):
        config = ModelConfig(
            network=network,
            backbone="resnet50",
            base_width=8,
            stage_sizes=(1, 2, 1, 1),
            head_width=4,
        )
        net = build_model(config, NYUV2)
        variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
        merged = with_pretrained_encoder(variables, encoder_from_torch(weights, config))
        trunk = merged["params"]["encoder"]
        trunk = trunk if network == "split" else trunk["backbone"]
        np.testing.assert_array_equal(
            trunk["stem_conv"]["kernel"], weights["conv1.weight"].transpose(2, 3, 1, 0)
        )
        stats = merged["batch_stats"]["encoder"]
        stats = stats if network == "split" else stats["backbone"]
        np.testing.assert_array_equal(
            stats["layer2_1"]["bn3"]["var"], weights["layer2.1.bn3.running_var"]
        )
        if network == "mtan":  # the attention modules keep their initialisation
            init = variables["params"]["encoder"]
            key = next(k for k in init if k.endswith("_att1"))
            np.testing.assert_array_equal(
                jax.tree_util.tree_leaves(merged["params"]["encoder"][key])[0],
                jax.tree_util.tree_leaves(init[key])[0],
            )


def test_bad_checkpoints_fail_in_one_line():
    config = ModelConfig(
        network="split", backbone="resnet50", base_width=8, stage_sizes=(1, 1, 1, 1)
    )
    weights = state_dict_of(randomise(ResNet(50, 8, (1, 1, 1, 1), dilated=True)))

    def message(state_dict, config=config):
        with pytest.raises(ValueError) as error:
            encoder_from_torch(state_dict, config)
        text = str(error.value)
        assert "\n" not in text
        return text

    missing = {k: v for k, v in weights.items() if k != "layer3.0.bn2.running_mean"}
    assert message(missing) == (
        "pretrained weights: missing key 'layer3.0.bn2.running_mean' (for encoder batch_stats "
        "layer3_0/bn2/mean, shape (32,))"
    )
    extra = {**weights, "layer5.0.conv1.weight": np.zeros((8, 8, 1, 1), np.float32)}
    assert message(extra).startswith(
        "pretrained weights: unexpected key 'layer5.0.conv1.weight' (shape (8, 8, 1, 1))"
    )
    wrong = {**weights, "conv1.weight": np.zeros((8, 3, 3, 3), np.float32)}
    assert message(wrong) == (
        "pretrained weights: key 'conv1.weight' has shape (8, 3, 3, 3); this resnet50 "
        "(base_width 8) needs (7, 7, 3, 8) in Flax's layout for stem_conv/kernel"
    )
    # ResNet-18's file for a ResNet-50: the first key that differs is named.
    resnet18 = state_dict_of(ResNet(18, 8, (1, 1, 1, 1)))
    assert "pretrained weights: " in message(resnet18)
    # The classifier and num_batches_tracked are ignored.
    assert "fc.weight" in weights and any(k.endswith("num_batches_tracked") for k in weights)


# --- Files and the entry points ---------------------------------------------------------


def tiny_trunk_file(tmp_path, name="trunk.safetensors", depth=18, base_width=4):
    from safetensors.numpy import save_file

    model = randomise(ResNet(depth, base_width, (1, 2, 1, 1), dilated=True), seed=3)
    weights = state_dict_of(model)
    save_file(weights, str(tmp_path / name))
    return tmp_path / name, weights


@pytest.mark.usefixtures("private_cache")
def test_a_run_starts_from_the_pretrained_trunk(tmp_path, monkeypatch):
    from conftest import tiny_config

    from experiments import loop

    path, weights = tiny_trunk_file(tmp_path)
    captured, logs = [], []
    monkeypatch.setattr(loop, "_train", lambda run, state, *args: captured.append(state) or {})
    config = tiny_config("nyuv2", train={"pretrained": str(path)})
    loop.train_and_evaluate(config, tmp_path / "run", progress=False, log=logs.append)
    (state,) = captured
    np.testing.assert_array_equal(
        state.params["encoder"]["layer2_1"]["conv2"]["kernel"],
        weights["layer2.1.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        state.batch_stats["encoder"]["stem_bn"]["mean"], weights["bn1.running_mean"]
    )
    assert any(line.startswith(f"encoder trunk from {path}") for line in logs), logs


@pytest.mark.usefixtures("private_cache")
def test_entry_point_bad_pretrained_files_fail_in_one_line_and_touch_nothing(tmp_path):
    from experiments import nyuv2

    garbage = tmp_path / "truncated.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    other, _ = tiny_trunk_file(tmp_path, "resnet50.safetensors", depth=50, base_width=8)
    cases = [
        (tmp_path / "none.safetensors", "none.safetensors: no such file"),
        (tmp_path / "weights.bin", "unknown format .bin; use .safetensors, .npz, .pth, .pt"),
        (garbage, "truncated.safetensors: cannot read it ("),
        (other, "resnet50.safetensors: "),
    ]
    (tmp_path / "weights.bin").write_bytes(b"")
    for path, message in cases:
        workdir = tmp_path / "run"
        with pytest.raises(SystemExit) as exit_info:
            nyuv2.main(["--synthetic", "--pretrained", str(path), "--workdir", str(workdir)])
        text = str(exit_info.value.code)
        assert f"--pretrained {tmp_path}" in text and message in text and "\n" not in text, text
        assert not workdir.exists()


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    import sys

    from experiments.weights import WeightsError, read_state_dict

    path = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(WeightsError, match="python -m experiments.convert_weights resnet50.pth"):
        read_state_dict(path)


def test_convert_weights_round_trips_pth_to_safetensors(tmp_path, capsys):
    from experiments import convert_weights
    from experiments.weights import read_state_dict

    model = randomise(ResNet(18, 4, (1, 1, 1, 1)))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pth")  # a wrapped checkpoint
    out = tmp_path / "r18.safetensors"
    assert convert_weights.main([str(tmp_path / "r18.pth"), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = read_state_dict(out)
    original = state_dict_of(model)
    assert set(converted) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(converted[key], value)
    with pytest.raises(SystemExit):  # an existing OUTPUT is not replaced without --overwrite
        convert_weights.main([str(tmp_path / "r18.pth"), str(out)])


# --- Against torchvision itself (fixtures made by tests/fixtures/make_torchvision_fixtures.py)

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def torchvision_layouts() -> dict:
    import json

    return json.loads((FIXTURES / "torchvision_layouts.json").read_text())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "swin_t"])
def test_every_torchvision_key_maps_onto_the_full_size_trunk(name):
    """Zeros in the exact shapes of torchvision's state dict load without a missing,
    unexpected or misshapen key, and the trunk has as many parameters as torchvision's
    without its classifier."""
    from dgr_jax.models import count_params

    layout = torchvision_layouts()[name]
    config = ModelConfig(network="split", backbone=name)
    loaded = encoder_from_torch({k: np.zeros(s, np.float32) for k, s in layout.items()}, config)
    trunk_values = sum(
        int(np.prod(s))
        for k, s in layout.items()
        if not k.startswith(("fc.", "head."))
        and not k.endswith(("num_batches_tracked", "relative_position_index"))
    )
    assert count_params(loaded) == trunk_values
    if name.startswith("resnet"):  # the torch reference trunk has torchvision's layout
        reference = ResNet(int(name[6:]), classes=1000).state_dict()
        assert {k: list(v.shape) for k, v in reference.items()} == layout


def test_swin_t_matches_torchvision_and_counts_its_parameters(report):
    from dgr_jax.models import count_params

    fixture = np.load(FIXTURES / "torchvision_swin_tiny.npz")
    state = {k[len("state/") :]: fixture[k] for k in fixture.files if k.startswith("state/")}
    config = ModelConfig(network="split", backbone="swin_t", base_width=8, stage_sizes=(1, 2, 1, 1))
    trunk = BACKBONES["swin_t"](config, BatchNorm)
    variables = encoder_from_torch(state, config)
    x = jnp.asarray(fixture["input"])
    for train in (False, True):  # no BatchNorm, stochastic depth off without a dropout rng
        ours = trunk.apply({"params": variables["params"]}, x, train=train)
        assert ours.shape == fixture["output"].shape
        assert rel_err(ours, fixture["output"]) < 1e-5
        report(
            f"swin_t (tiny) vs torchvision, {'train' if train else 'eval'} mode, float32: "
            f"{rel_err(ours, fixture['output']):.1e}"
        )
    full = ModelConfig(network="split", backbone="swin_t")
    shapes = jax.eval_shape(
        lambda: build_model(full, NYUV2).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 96, 128, 3)), train=False
        )
    )
    encoder = count_params(shapes["params"]["encoder"])
    report(f"swin_t: encoder {encoder:,} parameters (torchvision swin_t without its head)")
    assert encoder == 27_519_354
