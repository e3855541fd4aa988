"""Scene pipelines (NYUv2 / Cityscapes .npy folders -> TFDS -> tf.data): the batches are
checked against the files written here, augmentation against hand-predicted values."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import scenes
from data_pipelines.common import DataError

H, W = 8, 12


def write_folder(root: Path, fmt, counts=(("train", 6), ("val", 3)), seed=0, depth_channel=True):
    """Random data in ``fmt``'s layout; returns {split: {folder: [arrays]}}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in counts:
        written[split] = {}
        for field in fmt.fields:
            folder = root / split / field.folder
            folder.mkdir(parents=True)
            arrays = []
            for i in range(n):
                if field.kind == "image":
                    a = rng.uniform(size=(H, W, 3))
                elif field.kind == "label":
                    a = rng.integers(-1, fmt.num_classes[field.key], size=(H, W)).astype(np.float32)
                elif field.kind == "normal":
                    a = rng.normal(size=(H, W, 3))
                    a /= np.linalg.norm(a, axis=-1, keepdims=True)
                    a[:2] = 0.0  # invalid rows
                elif field.kind == "depth":
                    a = rng.uniform(0.5, 10.0, size=(H, W, 1))
                    a[:, :3] = 0.0
                else:  # disparity
                    a = rng.uniform(1.0, 50.0, size=(H, W, 1))
                    a[-2:] = -1.0
                if field.channels == 1 and not depth_channel:
                    a = a[..., 0]
                a = a.astype(np.float32)
                np.save(folder / f"{i}.npy", a)
                arrays.append(a)
            written[split][field.folder] = arrays
    return written


def listing(root: Path):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("fmt", [scenes.NYUV2, scenes.CITYSCAPES], ids=lambda f: f.name)
def test_round_trip_preserves_values_ignore_and_invalid(tmp_path, fmt):
    data = tmp_path / "data"
    written = write_folder(data, fmt, depth_channel=fmt is scenes.NYUV2)
    before = listing(data)
    ds = scenes.make_dataset(fmt, data, "val", 2, cache_dir=tmp_path / "cache", verbose=False)
    batches = list(ds)
    assert len(ds) == len(batches) == 2  # 3 examples, remainder kept for val
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    seen = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(seen, [0, 1, 2])  # val: no shuffle
    for field in fmt.fields:
        got = np.concatenate([b[field.key] for b in batches])
        want = np.stack(written["val"][field.folder])
        if field.channels == 1 and want.ndim == 3:
            want = want[..., None]
        if field.kind == "image":
            assert got.dtype == np.float32 and got.shape == (3, H, W, 3)
            np.testing.assert_allclose(got, 2.0 * want - 1.0, atol=1e-6)
            assert got.min() >= -1 and got.max() <= 1
        elif field.kind == "label":
            assert got.dtype == np.int32 and got.shape == (3, H, W)
            np.testing.assert_array_equal(got, want.astype(np.int32))
            assert (got == -1).any()
        else:
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
    # The user's folder is untouched; the records live in the cache.
    assert listing(data) == before
    assert any((tmp_path / "cache").rglob("*.array_record*"))


def test_seeded_order_resume_and_process_shards(tmp_path):
    data = tmp_path / "data"
    write_folder(data, scenes.NYUV2, counts=(("train", 10), ("val", 1)))
    kw = dict(cache_dir=tmp_path / "cache", verbose=False, augment=True)

    def indices(**extra):
        return [
            b["index"].tolist()
            for b in scenes.make_dataset(scenes.NYUV2, data, "train", 2, **kw, **extra)
        ]

    def images(**extra):
        return [
            b["image"] for b in scenes.make_dataset(scenes.NYUV2, data, "train", 2, **kw, **extra)
        ]

    first = indices(seed=3, epoch=0)
    assert sorted(sum(first, [])) == list(range(10))  # an epoch is a permutation
    assert first == indices(seed=3, epoch=0)
    assert first != indices(seed=3, epoch=1) and first != indices(seed=4, epoch=0)
    full, resumed = images(seed=3, epoch=1), images(seed=3, epoch=1, start_step=2)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):  # same examples and the same augmentation
        np.testing.assert_array_equal(a, b)
    shards = [
        sum(indices(seed=3, process_index=p, process_count=3, drop_remainder=True), [])
        for p in range(3)
    ]
    assert [len(s) for s in shards] == [2, 2, 2]  # every process the same number of batches
    shards_no_drop = [
        sum(
            (
                b["index"].tolist()
                for b in scenes.make_dataset(
                    scenes.NYUV2, data, "train", 2, process_index=p, process_count=3, **kw
                )
            ),
            [],
        )
        for p in range(3)
    ]
    assert sorted(sum(shards_no_drop, [])) == list(range(10))  # disjoint and covering
    assert all(set(a) <= set(b) for a, b in zip(shards, shards_no_drop))
    assert [len(s) for s in shards_no_drop] == [3, 4, 3]
    with pytest.raises(ValueError, match="start_step"):
        scenes.make_dataset(scenes.NYUV2, data, "train", 2, start_step=6, **kw)


def constant_example(fmt, depth=2.0, disp=3.0):
    """Fields chosen so that the effect of every augmentation can be predicted."""
    columns = np.tile(np.arange(W, dtype=np.float32), (H, 1))
    image = np.stack([columns / W, np.zeros((H, W)), np.ones((H, W))], -1).astype(np.float32)
    example = {"image": tf.constant(image), "index": tf.constant(0, tf.int64)}
    for field in fmt.fields[1:]:
        if field.kind == "label":
            example[field.key] = tf.constant(
                (np.arange(W) % fmt.num_classes[field.key])[None].repeat(H, 0), tf.int16
            )
        elif field.kind == "normal":
            normal = np.tile(np.array([0.6, 0.0, 0.8], np.float32), (H, W, 1))
            normal[:, : W // 2] = 0.0
            example[field.key] = tf.constant(normal)
        elif field.kind == "depth":
            d = np.full((H, W, 1), depth, np.float32)
            d[: H // 2] = 0.0
            example[field.key] = tf.constant(d)
        else:
            d = np.full((H, W, 1), disp, np.float32)
            d[: H // 2] = -1.0
            example[field.key] = tf.constant(d)
    return example


@pytest.mark.parametrize("fmt", [scenes.NYUV2, scenes.CITYSCAPES], ids=lambda f: f.name)
def test_augmentation_scale_crop_flip_and_value_rules(fmt):
    example = constant_example(fmt)
    crop_h, crop_w = (
        (H, W) if fmt.name == "nyuv2" else (H, W // 2)
    )  # Cityscapes: 256x256 of 256x512
    scales, flips = [], []
    for s in range(60):
        out = scenes.augment_example(example, fmt, tf.constant([7, s], tf.int64))
        scale, flip = float(out["scale"]), bool(out["flip"])
        scales.append(scale)
        flips.append(flip)
        for key, value in example.items():
            assert out[key].dtype == value.dtype
            assert out[key].shape == (
                (crop_h, crop_w) + tuple(value.shape[2:]) if value.shape.rank else ()
            )
        for field in fmt.fields[1:]:
            got = out[field.key].numpy()
            if field.kind == "label":  # nearest neighbour: only original class values
                assert set(np.unique(got)) <= set(range(fmt.num_classes[field.key]))
            elif field.kind == "normal":  # nearest neighbour: each pixel a copy of a source pixel
                valid = np.any(got != 0, axis=-1)
                np.testing.assert_array_equal(
                    got[valid],
                    np.tile(np.float32([-0.6 if flip else 0.6, 0.0, 0.8]), (valid.sum(), 1)),
                )
                np.testing.assert_array_equal(got[~valid], 0.0)
                assert valid.any() and (~valid).any()
            elif field.kind == "depth":
                assert np.all((got == 0.0) | np.isclose(got, 2.0 / scale, rtol=1e-6))
                assert (got > 0).any()
            elif field.kind == "disp":
                assert np.all((got == -1.0) | np.isclose(got, 3.0 * scale, rtol=1e-6))
                assert (got > 0).any()
        if scale == 1.0 and crop_w == W:  # a pure flip (or nothing): compare with numpy
            for key in ("image",) + tuple(f.key for f in fmt.fields[1:]):
                want = example[key].numpy()
                if flip:
                    want = want[:, ::-1].copy()
                    if key == "normal":
                        want[..., 0] *= -1
                np.testing.assert_allclose(out[key].numpy(), want, atol=1e-6, err_msg=key)
    assert {round(s, 4) for s in scales} == ({1.0, 1.2, 1.5} if fmt.name == "nyuv2" else {1.0})
    assert 15 < sum(flips) < 45
    # Same seed, same result.
    a = scenes.augment_example(example, fmt, tf.constant([1, 2], tf.int64))
    b = scenes.augment_example(example, fmt, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_resized_sizes_truncate_as_the_original():
    # int(288 * 1.2) = int(345.6) = 345, int(384 * 1.2) = 460; rounding would give 346 x 461.
    assert scenes.NYUV2.augmentation.resized_sizes(288, 384) == ((288, 384), (345, 460), (432, 576))
    rounded = scenes.Augmentation(resize_rule="half_pixel")
    assert rounded.resized_sizes(288, 384) == ((288, 384), (346, 461), (432, 576))
    assert scenes.CITYSCAPES.augmentation.crop_size(256, 512) == (256, 256)


def legacy_nearest_by_hand(out_size, in_size):
    """PyTorch's upsample_nearest2d: src = min(floor(dst * (float)in / out), in - 1), float32."""
    ratio = np.float32(in_size) / np.float32(out_size)
    return np.minimum(
        np.floor(np.arange(out_size, dtype=np.float32) * ratio).astype(np.int64), in_size - 1
    )


@pytest.mark.parametrize(
    "out_size, in_size", [(345, 288), (460, 384), (432, 288), (576, 384), (14, 12), (12, 12)]
)
def test_legacy_nearest_indices_follow_the_floor_rule(out_size, in_size):
    got = scenes.legacy_nearest_indices(out_size, in_size).numpy()
    np.testing.assert_array_equal(got, legacy_nearest_by_hand(out_size, in_size))
    # It is not TF's half-pixel nearest (which the pipeline used before).
    half_pixel = np.minimum(
        np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1
    )
    assert out_size == in_size or (got != half_pixel).any()


def test_legacy_nearest_indices_equal_torch_interpolate():
    torch = pytest.importorskip("torch")
    for out_size, in_size in [(345, 288), (460, 384), (432, 288), (576, 384)]:
        source = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1)
        want = torch.nn.functional.interpolate(source, size=(out_size, 1), mode="nearest")[
            0, 0, :, 0
        ].numpy()
        np.testing.assert_array_equal(
            scenes.legacy_nearest_indices(out_size, in_size).numpy(), want
        )
    # The image: TF's bilinear resize is torch's (align_corners=False) when upscaling.
    image = np.random.default_rng(0).uniform(size=(H, W, 3)).astype(np.float32)
    want = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=(int(H * 1.5), int(W * 1.2)),
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = tf.image.resize(image, (int(H * 1.5), int(W * 1.2)), method="bilinear").numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("rule", ["legacy", "half_pixel"])
def test_resized_normals_stay_unit_and_keep_their_validity(rule):
    """A hand-built normal map (random unit normals, a block of invalid pixels, stripes of
    unit normals whose channels sum to 0) through scale 1.2: every output pixel is a copy
    of a source pixel, so valid normals stay unit and invalid ones stay zero."""
    rng = np.random.default_rng(4)
    normal = rng.normal(size=(H, W, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[2:5, 3:7] = 0.0
    normal[:, -1] = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
    example = constant_example(scenes.NYUV2)
    example["normal"] = tf.constant(normal.astype(np.float32))
    augmentation = scenes.Augmentation(scales=(1.2,), resize_rule=rule)
    seen = 0
    for s in range(20):
        out = scenes.augment_example(
            example, scenes.NYUV2, tf.constant([3, s], tf.int64), augmentation
        )
        got = out["normal"].numpy()
        if bool(out["flip"]):
            got = got[:, ::-1] * np.array([-1.0, 1.0, 1.0], np.float32)
        valid = np.any(got != 0, axis=-1)
        np.testing.assert_allclose(np.linalg.norm(got[valid], axis=-1), 1.0, rtol=1e-6)
        assert (~valid).any() and valid.any()
        # Every output normal is one of the source normals, exactly.
        sources = {tuple(v) for v in normal.astype(np.float32).reshape(-1, 3)}
        assert all(tuple(v) in sources for v in got.reshape(-1, 3))
        if rule == "legacy":  # and exactly the one the floor rule picks
            new_h, new_w = int(H * 1.2), int(W * 1.2)
            rows, cols = legacy_nearest_by_hand(new_h, H), legacy_nearest_by_hand(new_w, W)
            crops = [
                normal.astype(np.float32)[rows[top : top + H]][:, cols[left : left + W]]
                for top in range(new_h - H + 1)
                for left in range(new_w - W + 1)
            ]
            assert any(np.array_equal(got, c) for c in crops)
        seen += 1
    assert seen == 20


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path):
    data = tmp_path / "data"
    write_folder(data, scenes.NYUV2, counts=(("train", 2), ("val", 1)))
    cache = tmp_path / "cache"
    first = scenes.prepare(scenes.NYUV2, data, cache_dir=cache, verbose=False)
    stamp = listing(cache)
    again = scenes.prepare(scenes.NYUV2, data, cache_dir=cache, verbose=False)
    assert str(first.data_dir) == str(again.data_dir) and listing(cache) == stamp
    image = np.full((H, W, 3), 0.25, np.float32)
    np.save(data / "val" / "image" / "0.npy", image)
    os.utime(data / "val" / "image" / "0.npy", ns=(1, 1))
    rebuilt = scenes.prepare(scenes.NYUV2, data, cache_dir=cache, verbose=False)
    assert str(rebuilt.data_dir) != str(first.data_dir)
    batch = next(
        iter(scenes.make_dataset(scenes.NYUV2, data, "val", 1, cache_dir=cache, verbose=False))
    )
    np.testing.assert_allclose(batch["image"], -0.5)


def broken(tmp_path, change):
    data = tmp_path / "data"
    write_folder(data, scenes.NYUV2, counts=(("train", 3), ("val", 2)))
    change(data)
    return data


BAD_INPUTS = {
    "missing root": (lambda d: None, "does not exist", "nowhere"),
    "missing split": (
        lambda d: os.rename(d / "val", d / "valid"),
        "missing nyuv2 split folder",
        "val",
    ),
    "missing folder": (
        lambda d: (
            [p.unlink() for p in (d / "train" / "normal").iterdir()]
            and (d / "train" / "normal").rmdir()
        ),
        "missing folder",
        "normal",
    ),
    "count mismatch": (
        lambda d: (d / "train" / "depth" / "2.npy").unlink(),
        "different numbers of files",
        "train",
    ),
    "gap in numbering": (
        lambda d: os.rename(d / "train" / "label" / "2.npy", d / "train" / "label" / "7.npy"),
        "missing 2.npy",
        "label",
    ),
    "wrong shape": (
        lambda d: np.save(d / "train" / "depth" / "1.npy", np.zeros((H, W + 1, 1), np.float32)),
        "shape",
        "depth/1.npy",
    ),
    "wrong dtype": (
        lambda d: np.save(d / "val" / "image" / "1.npy", np.zeros((H, W, 3), np.uint8)),
        "dtype uint8",
        "image/1.npy",
    ),
    "unreadable": (
        lambda d: (d / "train" / "normal" / "0.npy").write_bytes(b"not numpy"),
        "unreadable",
        "normal/0.npy",
    ),
    "fractional labels": (
        lambda d: np.save(d / "train" / "label" / "0.npy", np.full((H, W), 0.5, np.float32)),
        "not integers",
        "label/0.npy",
    ),
    "labels out of range": (
        lambda d: np.save(d / "val" / "label" / "1.npy", np.full((H, W), 13, np.int64)),
        "expected 0..12",
        "label/1.npy",
    ),
    "images as 0..255": (
        lambda d: np.save(d / "train" / "image" / "2.npy", np.full((H, W, 3), 200.0, np.float32)),
        "stored as 0..255? divide by 255",
        "image/2.npy",
    ),
    "negative depth": (
        lambda d: np.save(d / "val" / "depth" / "0.npy", np.full((H, W, 1), -0.5, np.float32)),
        "negative depth -0.5",
        "depth/0.npy",
    ),
    "normals not unit": (
        lambda d: np.save(d / "train" / "normal" / "1.npy", np.full((H, W, 3), 0.9, np.float32)),
        "expected unit vectors",
        "normal/1.npy",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_folders_give_one_line_errors_naming_the_path(tmp_path, case):
    change, message, where = BAD_INPUTS[case]
    data = broken(tmp_path, change) if case != "missing root" else tmp_path / "nowhere"
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        scenes.make_dataset(scenes.NYUV2, data, "train", 1, cache_dir=cache, verbose=False)
    text = str(error.value)
    assert message in text and where in text and "\n" not in text, text
    # Nothing half-written is left in the cache.
    assert (
        not any(p.name.startswith("incomplete") for p in cache.rglob("*"))
        if cache.exists()
        else True
    )
    assert not any(cache.rglob("*.array_record*")) if cache.exists() else True


@pytest.mark.parametrize("kind", ["nyuv2", "cityscapes"])
def test_generated_scenes_go_through_the_same_builder(tmp_path, kind):
    from data_pipelines import synthetic

    root = synthetic.write_scenes(
        tmp_path / "scenes", kind=kind, num_train=5, num_val=2, height=24, width=32, seed=1
    )
    fmt = scenes.FORMATS[kind]
    batches = list(
        scenes.make_dataset(fmt, root, "train", 2, cache_dir=tmp_path / "cache", verbose=False)
    )
    assert [len(b["index"]) for b in batches] == [2, 2, 1]  # 5 examples: a short last batch is kept
    crop_w = 32 if kind == "nyuv2" else 16
    for batch in batches:
        size = len(batch["index"])
        assert batch["image"].shape == (size, 24, crop_w, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        for field in fmt.fields[1:]:
            value = batch[field.key]
            if field.kind == "label":
                assert (
                    value.dtype == np.int32
                    and value.min() >= -1
                    and value.max() < fmt.num_classes[field.key]
                )
            elif field.kind == "depth":
                assert value.shape == (size, 24, crop_w, 1) and value.min() >= 0.0
            elif field.kind == "disp":
                assert ((value == -1.0) | (value > 0)).all()
            else:
                norms = np.linalg.norm(value, axis=-1)  # nearest neighbour: unit or zero, exactly
                assert np.all((norms == 0) | (np.abs(norms - 1.0) < 1e-5))
    # Unaugmented validation data equals the files, value for value.
    val = next(
        iter(scenes.make_dataset(fmt, root, "val", 2, cache_dir=tmp_path / "cache", verbose=False))
    )
    for field in fmt.fields:
        want = np.stack([np.load(root / "val" / field.folder / f"{i}.npy") for i in range(2)])
        got = val[field.key]
        if field.kind == "image":
            np.testing.assert_allclose(got, want * 2 - 1, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want.reshape(got.shape).astype(got.dtype))
