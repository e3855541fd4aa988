"""Models: shapes, upsampling, normalisation, dummy sets and parameter counts.

Parameter counts are checked two ways, both independent of the Flax code: at full
size against torchvision's published totals, and at reduced width against counts
derived here from the layer shapes of the PyTorch reference architectures.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgr_jax import dgr_penalty, heads_penalty, init_dummy_sets, multitask_dummy_loss
from dgr_jax.models import (
    ModelConfig,
    ResNet,
    bilinear_resize_align_corners,
    build_model,
    count_params,
    heads_apply_fn,
)
from dgr_jax.models.heads import TrimmedConv
from dgr_jax.tasks import CITYSCAPES, NYUV2, UTKFACE, task_losses

TINY = dict(base_width=4, head_width=8, stage_sizes=(1, 2, 1, 1))

# ---------------------------------------------------------------------------
# Independent parameter counts from the PyTorch layer shapes.


def conv_params(c_in, c_out, k, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn_params(c):
    return 2 * c


def bottleneck_params(c_in, planes):
    n = conv_params(c_in, planes, 1) + bn_params(planes)
    n += conv_params(planes, planes, 3) + bn_params(planes)
    n += conv_params(planes, 4 * planes, 1) + bn_params(4 * planes)
    if c_in != 4 * planes:
        n += conv_params(c_in, 4 * planes, 1) + bn_params(4 * planes)
    return n


def basic_params(c_in, planes, stride):
    n = (
        conv_params(c_in, planes, 3)
        + bn_params(planes)
        + conv_params(planes, planes, 3)
        + bn_params(planes)
    )
    if stride != 1 or c_in != planes:
        n += conv_params(c_in, planes, 1) + bn_params(planes)
    return n


def resnet_params(depth, base, stage_sizes):
    n = conv_params(3, base, 7) + bn_params(base)
    c = base
    for i, blocks in enumerate(stage_sizes):
        planes = base * 2**i
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            if depth >= 50:
                n += bottleneck_params(c, planes)
                c = 4 * planes
            else:
                n += basic_params(c, planes, stride)
                c = planes
    return n


def deeplab_head_params(c_in, width, c_out):
    n = conv_params(c_in, width, 1) + 3 * conv_params(c_in, width, 3) + conv_params(c_in, width, 1)
    n += conv_params(5 * width, width, 1) + conv_params(width, width, 3) + 7 * bn_params(width)
    return n + conv_params(width, c_out, 1, bias=True)


def mtan_extra_params(base, stage_sizes, num_tasks):
    """Attention masks per task and the three shared bottleneck blocks (auto-lambda)."""
    out = [4 * base * 2**i for i in range(4)]
    # input of each stage's last block: the stage's own width, or the previous stage's
    # output when the stage has a single block (stage 1: the stem's width).
    before_last = [out[i] if stage_sizes[i] > 1 else (out[i - 1] if i else base) for i in range(4)]
    n = 0
    for i in range(4):
        c_in = before_last[i] + (out[i] if i else 0)
        hidden = out[i] // 4
        n += num_tasks * (
            conv_params(c_in, hidden, 1, True)
            + bn_params(hidden)
            + conv_params(hidden, out[i], 1, True)
            + bn_params(out[i])
        )
    for i in range(3):
        n += bottleneck_params(out[i], out[i + 1] // 4)
    return n


def test_full_size_resnets_match_torchvision_totals():
    # torchvision's published totals minus the 1000-way fc layer.
    published = {
        18: 11_689_512 - 513_000,
        34: 21_797_672 - 513_000,
        50: 25_557_032 - 2_049_000,
        101: 44_549_160 - 2_049_000,
    }
    for depth, expected in published.items():
        for output_stride in (8, 32):
            model = ResNet(depth, output_stride)
            shapes = jax.eval_shape(
                lambda k, x, model=model: model.init(k, x, train=False),
                jax.random.PRNGKey(0),
                jnp.zeros((1, 64, 64, 3)),
            )
            assert count_params(shapes["params"]) == expected, (depth, output_stride)
            assert (
                resnet_params(
                    depth,
                    64,
                    {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[
                        depth
                    ],
                )
                == expected
            )


def test_full_size_deeplab_head_matches_torchvision_deeplabv3_resnet50():
    # torchvision deeplabv3_resnet50(num_classes=21, aux_loss=True): 42,004,074 parameters
    # = backbone + DeepLabHead(2048, 21) + FCNHead(1024, 21) (3x3 conv 256, BN, 1x1 conv).
    net = build_model(ModelConfig(network="split"), ())
    heads = type(net.heads)((("seg", 21),), ())
    shapes = jax.eval_shape(
        lambda k, z: heads.init(k, z, (64, 64), train=False),
        jax.random.PRNGKey(0),
        jnp.zeros((1, 8, 8, 2048)),
    )
    fcn_aux = conv_params(1024, 256, 3) + bn_params(256) + conv_params(256, 21, 1, True)
    assert 23_508_032 + count_params(shapes["params"]) + fcn_aux == 42_004_074
    assert count_params(shapes["params"]) == deeplab_head_params(2048, 256, 21)


@pytest.mark.parametrize(
    "network, tasks",
    [("split", NYUV2), ("split", CITYSCAPES), ("mtan", NYUV2), ("mtan", CITYSCAPES)],
)
def test_reduced_width_scene_counts_and_shapes(network, tasks):
    net = build_model(ModelConfig(network=network, **TINY), tasks)
    images = jnp.zeros((2, 40, 56, 3), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), images, train=False)
    features, outputs = net.apply(variables, images, train=False)
    encoder = resnet_params(50, 4, TINY["stage_sizes"])
    if network == "mtan":
        encoder += mtan_extra_params(4, TINY["stage_sizes"], len(tasks))
    assert count_params(variables["params"]["encoder"]) == encoder
    assert count_params(variables["params"]["heads"]) == sum(
        deeplab_head_params(128, 8, t.channels) for t in tasks
    )
    feature_list = list(features.values()) if network == "mtan" else [features]
    assert all(f.shape == (2, 5, 7, 128) for f in feature_list)  # output stride 8
    for task in tasks:
        assert outputs[task.name].shape == (2, 40, 56, task.channels)


def test_classifier_counts_and_shapes():
    net = build_model(ModelConfig(network="classifier", dilated=False, **TINY), UTKFACE)
    images = jnp.zeros((3, 32, 32, 3), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), images, train=False)
    features, outputs = net.apply(variables, images, train=False)
    assert features.shape == (3, 128)
    assert {k: v.shape for k, v in outputs.items()} == {
        "age": (3, 7),
        "gender": (3, 2),
        "ethnicity": (3, 5),
    }
    heads = sum(128 * 64 + 64 + 64 * t.channels + t.channels for t in UTKFACE)
    assert count_params(variables["params"]["heads"]) == heads
    assert count_params(variables["params"]["encoder"]) == resnet_params(50, 4, TINY["stage_sizes"])


def test_linear_classifier_head_is_one_torch_linear():
    from dgr_jax.errors import ConfigError
    from dgr_jax.tasks import IMAGENET

    config = ModelConfig(network="classifier", classifier_hidden=0, **TINY)
    net = build_model(config, IMAGENET)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), images, train=False)
    features, outputs = net.apply(variables, images, train=False)
    head = variables["params"]["heads"]["label"]
    assert jax.tree_util.tree_map(jnp.shape, head) == {
        "fc": {"kernel": (128, 1000), "bias": (1000,)}
    }  # torchvision's fc: 128 * 1000 + 1000 parameters
    kernel, bias = np.asarray(head["fc"]["kernel"]), np.asarray(head["fc"]["bias"])
    np.testing.assert_allclose(
        outputs["label"], np.asarray(features) @ kernel + bias, rtol=1e-5, atol=1e-5
    )
    # nn.Linear's default init: weights and bias uniform in +-1 / sqrt(fan_in)
    bound = 1 / np.sqrt(128)
    for values in (kernel, bias):
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    with pytest.raises(ConfigError, match="classifier_hidden must be >= 0, got -1"):
        ModelConfig(network="classifier", classifier_hidden=-1)


def test_undilated_and_dilated_output_strides():
    x = jnp.zeros((1, 64, 96, 3))
    for stride in (8, 32):
        model = ResNet(18, stride, 4)
        y = model.apply(model.init(jax.random.PRNGKey(0), x, False), x, False)
        assert y.shape[1:3] == (64 // stride, 96 // stride)


def test_mtan_rejects_undilated_backbone():
    with pytest.raises(ValueError, match="needs a dilated backbone"):
        ModelConfig(network="mtan", dilated=False)


# ---------------------------------------------------------------------------
# Upsampling and normalisation.


def reference_align_corners(x, out_h, out_w):
    """PyTorch's bilinear, align_corners=True, one output pixel at a time (float64)."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c))
    for i, j in itertools.product(range(out_h), range(out_w)):
        src_y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        src_x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
        y0, x0 = int(np.floor(src_y)), int(np.floor(src_x))
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        dy, dx = src_y - y0, src_x - x0
        out[:, i, j] = (
            (1 - dy) * (1 - dx) * x[:, y0, x0]
            + (1 - dy) * dx * x[:, y0, x1]
            + dy * (1 - dx) * x[:, y1, x0]
            + dy * dx * x[:, y1, x1]
        )
    return out


@pytest.mark.parametrize(
    "in_size, out_size", [((3, 5), (9, 17)), ((4, 4), (7, 3)), ((1, 3), (5, 6))]
)
def test_bilinear_align_corners_matches_pixelwise_reference(in_size, out_size):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3))
    y = bilinear_resize_align_corners(jnp.asarray(x), out_size)
    np.testing.assert_allclose(y, reference_align_corners(x, *out_size), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[:, -1, -1], x[:, -1, -1], rtol=1e-12)  # corners coincide


def reference_dilated_conv(x, kernel, dilation):
    """Zero-padded 'same' dilated convolution by explicit loops over taps (float64)."""
    n, h, w, _ = x.shape
    k = kernel.shape[0]
    half = k // 2
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for a, b in itertools.product(range(k), range(k)):
        dy, dx = (a - half) * dilation, (b - half) * dilation
        shifted = np.zeros_like(x)
        ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        yt, xt = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
        shifted[:, ys, xs] = x[:, yt, xt]
        out += shifted @ kernel[a, b]
    return out


@pytest.mark.parametrize(
    "size, dilation", [((12, 16), 12), ((12, 16), 36), ((5, 9), 4), ((6, 6), 1), ((1, 1), 2)]
)
def test_trimmed_conv_equals_full_dilated_conv_with_gradients(size, dilation):
    # ASPP taps that can only meet zero padding are skipped; value and every gradient
    # (zero for the skipped taps) must equal the full convolution's.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *size, 3))
    conv = TrimmedConv(4, 3, dilation=dilation, use_bias=True, param_dtype=jnp.float64)
    params = conv.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    np.testing.assert_allclose(
        conv.apply({"params": params}, jnp.asarray(x)),
        reference_dilated_conv(x, kernel, dilation) + bias,
        rtol=1e-10,
        atol=1e-10,
    )
    weights = rng.normal(size=(2, *size, 4))
    grads = jax.grad(
        lambda p, xx: jnp.sum(weights * conv.apply({"params": p}, xx)), argnums=(0, 1)
    )(params, jnp.asarray(x))
    # The function is linear in kernel and x, so gradients follow from the reference by
    # unit perturbations: d/dkernel[a,b,i,o] = sum(weights * conv(x, e_abio)).
    grad_kernel = np.zeros_like(kernel)
    for index in itertools.product(*map(range, kernel.shape)):
        unit = np.zeros_like(kernel)
        unit[index] = 1.0
        grad_kernel[index] = np.sum(weights * reference_dilated_conv(x, unit, dilation))
    np.testing.assert_allclose(grads[0]["kernel"], grad_kernel, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grads[0]["bias"], weights.sum(axis=(0, 1, 2)), rtol=1e-10)
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)  # adjoint of a 'same' conv
    np.testing.assert_allclose(
        grads[1], reference_dilated_conv(weights, flipped, dilation), rtol=1e-10, atol=1e-10
    )


def test_normal_outputs_are_unit_vectors_and_others_are_not():
    net = build_model(ModelConfig(network="split", **TINY), NYUV2)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 40, 56, 3), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), images, train=False)
    _, outputs = net.apply(variables, images, train=False)
    np.testing.assert_allclose(jnp.linalg.norm(outputs["normal"], axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(jnp.linalg.norm(outputs["seg"][..., :3], axis=-1), 1.0)


# ---------------------------------------------------------------------------
# Dummy sets and the encoder-once rule.


@pytest.fixture(scope="module", params=["split", "mtan"])
def tiny_scene(request):
    net = build_model(ModelConfig(network=request.param, dropout_rate=0.0, **TINY), NYUV2)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 40, 56, 3)), jnp.float32)
    targets = {
        "seg": jnp.asarray(rng.integers(-1, 13, (2, 40, 56)), jnp.int32),
        "depth": jnp.asarray(rng.uniform(0, 3, (2, 40, 56, 1)), jnp.float32),
        "normal": jnp.asarray(rng.normal(size=(2, 40, 56, 3)), jnp.float32),
    }
    variables = net.init(jax.random.PRNGKey(0), images, train=False)
    features, _ = net.apply(variables, images, train=False)
    dummy = init_dummy_sets(net.heads, jax.random.PRNGKey(5), 3, features, (40, 56), train=False)
    return net, variables, images, targets, dummy


def test_dummy_sets_differ_from_each_other_and_from_task_heads(tiny_scene):
    net, variables, _, _, dummy = tiny_scene
    heads = variables["params"]["heads"]
    for path, head_leaf in jax.tree_util.tree_leaves_with_path(heads):
        stacked = dummy
        for key in path:
            stacked = stacked[key.key]
        assert stacked.shape == (3,) + head_leaf.shape
        if "kernel" in jax.tree_util.keystr(path):  # BN scales start at 1 in every copy
            sets = [np.asarray(stacked[k]) for k in range(3)]
            assert not np.allclose(sets[0], sets[1]) and not np.allclose(sets[1], sets[2])
            assert not any(np.allclose(s, head_leaf) for s in sets)


def test_penalty_on_features_equals_penalty_on_full_model(tiny_scene):
    """Encoder once + penalty on features == penalty of the whole model, d/d encoder."""
    net, variables, images, targets, dummy = tiny_scene
    losses = task_losses(NYUV2)
    apply_heads = heads_apply_fn(net.heads, (40, 56))
    batch_stats = variables["batch_stats"]["encoder"]

    def encode(encoder_params):
        features, _ = net.encoder.apply(
            {"params": encoder_params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return features

    def via_features(encoder_params):
        return heads_penalty(apply_heads, dummy, encode(encoder_params), targets, losses)

    def full_model_loss(dummy_params, encoder_params):
        return multitask_dummy_loss(apply_heads, losses)(
            dummy_params, encode(encoder_params), targets
        )

    def via_full_model(encoder_params):
        return dgr_penalty(full_model_loss, dummy, encoder_params, stacked=True)

    encoder_params = variables["params"]["encoder"]
    value_a, grad_a = jax.value_and_grad(via_features)(encoder_params)
    value_b, grad_b = jax.value_and_grad(via_full_model)(encoder_params)
    np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
    flat_a = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grad_a)])
    flat_b = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grad_b)])
    assert float(jnp.linalg.norm(flat_a - flat_b) / jnp.linalg.norm(flat_b)) < 1e-5
    assert float(jnp.linalg.norm(flat_b)) > 0


# ---------------------------------------------------------------------------
# Fidelity to the original code: auto-lambda's DeepLabHead (no dropout) and PyTorch's
# BatchNorm running variance, against float64 numpy written from the PyTorch modules.


def numpy_conv(x, kernel, dilation=1, bias=None):
    """'same' convolution, padding dilation * (k // 2), NHWC x HWIO, by summing taps."""
    k = kernel.shape[0]
    pad = dilation * (k // 2)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(k):
        for j in range(k):
            window = padded[
                :, i * dilation : i * dilation + height, j * dilation : j * dilation + width
            ]
            out += np.einsum("nhwc,co->nhwo", window, kernel[i, j])
    return out if bias is None else out + bias


def numpy_batch_norm_train(x, params, eps=1e-5):
    """torch BatchNorm2d in training mode: normalise with the biased batch variance; the
    running variance is updated with the unbiased one (n / (n - 1))."""
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    n = x.size // x.shape[-1]
    running_var = 0.9 * 1.0 + 0.1 * var * n / (n - 1)
    return (
        (x - mean) / np.sqrt(var + eps) * params["scale"] + params["bias"],
        0.1 * mean,
        running_var,
    )


def numpy_deeplab_head(x, p, rates):
    """auto-lambda's DeepLabHead: ASPP(1x1, dilated 3x3 per rate, pooling) -> project
    (1x1, BN, ReLU; no dropout) -> 3x3, BN, ReLU -> 1x1 with bias. Returns output, stats."""
    stats = {}

    def conv_bn_relu(inputs, kernel, name, dilation=1):
        y, mean, var = numpy_batch_norm_train(
            numpy_conv(inputs, p[f"{name}_conv"]["kernel"], dilation), p[f"{name}_bn"]
        )
        stats[f"{name}_bn"] = {"mean": mean, "var": var}
        return np.maximum(y, 0.0)

    branches = [conv_bn_relu(x, 1, "aspp_1x1")]
    branches += [conv_bn_relu(x, 3, f"aspp_rate{r}", r) for r in rates]
    pooled = conv_bn_relu(x.mean(axis=(1, 2), keepdims=True), 1, "aspp_pool")
    branches.append(np.broadcast_to(pooled, x.shape[:3] + (pooled.shape[-1],)))
    y = conv_bn_relu(np.concatenate(branches, axis=-1), 1, "aspp_project")
    y = conv_bn_relu(y, 3, "conv")
    return numpy_conv(y, p["classifier"]["kernel"], bias=p["classifier"]["bias"]), stats


def test_deeplab_head_in_training_mode_equals_the_original_head_without_dropout():
    from dgr_jax.models import DeepLabHead

    rates = (1, 2, 3)
    head = DeepLabHead(num_outputs=5, width=6, rates=rates)
    x = np.random.default_rng(0).normal(size=(4, 5, 6, 7))
    variables = head.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    want, want_stats = numpy_deeplab_head(x, params, rates)
    outputs = []
    for seed in (1, 2):  # a dropout would draw from these keys
        out, updates = head.apply(
            variables,
            jnp.asarray(x),
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(seed)},
        )
        outputs.append(np.asarray(out))
    np.testing.assert_allclose(outputs[0], want, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    for name, stats in want_stats.items():  # the pooling branch reduces over n = 4 only: 4/3
        # (running statistics are stored in float32: 0.9 * 1.0 rounds at 3e-8)
        np.testing.assert_allclose(updates["batch_stats"][name]["var"], stats["var"], rtol=1e-7)
        np.testing.assert_allclose(
            updates["batch_stats"][name]["mean"], stats["mean"], rtol=1e-9, atol=1e-12
        )
    # torchvision's dropout stays available as an option, and is then active in training.
    dropped = DeepLabHead(num_outputs=5, width=6, rates=rates, dropout_rate=0.5)
    out_a = dropped.apply(
        variables,
        jnp.asarray(x),
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(1)},
    )[0]
    assert not np.allclose(out_a, want)


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_running_variance_unbiased_as_torch_or_biased_as_flax(unbiased):
    from dgr_jax.models.batch_norm import BatchNorm

    x = np.random.default_rng(3).normal(
        2.0, 0.5, size=(4, 1, 1, 3)
    )  # ASPP pooling: n = 4 per channel
    layer = BatchNorm(unbiased_running_var=unbiased)
    variables = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    y, updates = layer.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - x.mean(axis=(0, 1, 2))) / np.sqrt(var + 1e-5), rtol=1e-10)
    factor = 4 / 3 if unbiased else 1.0
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * factor * var, rtol=1e-7)
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-12
    )
    # Evaluation normalises with the running statistics.
    evaluated = BatchNorm(use_running_average=True).apply({**variables, **updates}, jnp.asarray(x))
    np.testing.assert_allclose(
        evaluated,
        (x - 0.1 * x.mean(axis=(0, 1, 2))) / np.sqrt(0.9 + 0.1 * factor * var + 1e-5),
        rtol=1e-7,
    )
