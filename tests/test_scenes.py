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
        return [b["index"].tolist() for b in scenes.make_dataset(scenes.NYUV2, data, "train", 2, **kw, **extra)]

    def images(**extra):
        return [b["image"] for b in scenes.make_dataset(scenes.NYUV2, data, "train", 2, **kw, **extra)]

    first = indices(seed=3, epoch=0)
    assert sorted(sum(first, [])) == list(range(10))  # an epoch is a permutation
    assert first == indices(seed=3, epoch=0)
    assert first != indices(seed=3, epoch=1) and first != indices(seed=4, epoch=0)
    full, resumed = images(seed=3, epoch=1), images(seed=3, epoch=1, start_step=2)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):  # same examples and the same augmentation
        np.testing.assert_array_equal(a, b)
    shards = [sum(indices(seed=3, process_index=p, process_count=3), []) for p in range(3)]
    shards_no_drop = [sum((b["index"].tolist() for b in scenes.make_dataset(
        scenes.NYUV2, data, "train", 2, process_index=p, process_count=3, drop_remainder=False, **kw)), [])
        for p in range(3)]
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
            example[field.key] = tf.constant((np.arange(W) % fmt.num_classes[field.key])[None].repeat(H, 0), tf.int16)
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
    scales, flips = [], []
    for s in range(60):
        out = scenes.augment_example(example, fmt, tf.constant([7, s], tf.int64))
        scale, flip = float(out["scale"]), bool(out["flip"])
        scales.append(scale)
        flips.append(flip)
        for key, value in example.items():
            assert out[key].shape == value.shape and out[key].dtype == value.dtype
        for field in fmt.fields[1:]:
            got = out[field.key].numpy()
            if field.kind == "label":  # nearest neighbour: only original class values
                assert set(np.unique(got)) <= set(range(fmt.num_classes[field.key]))
            elif field.kind == "normal":
                valid = np.any(got != 0, axis=-1)
                # Bilinear at the valid/invalid boundary mixes; away from it the x sign flips only.
                inner = got[np.abs(got[..., 2] - 0.8) < 1e-6]
                np.testing.assert_allclose(inner[:, 0], -0.6 if flip else 0.6, atol=1e-6)
                np.testing.assert_allclose(inner[:, 1], 0.0, atol=1e-7)
                assert valid.any() and (~valid).any()
            elif field.kind == "depth":
                assert np.all((got == 0.0) | np.isclose(got, 2.0 / scale, rtol=1e-6))
                assert (got > 0).any()
            elif field.kind == "disp":
                assert np.all((got == -1.0) | np.isclose(got, 3.0 * scale, rtol=1e-6))
                assert (got > 0).any()
        if scale == 1.0:  # a pure flip (or nothing): compare with numpy
            for key in ("image",) + tuple(f.key for f in fmt.fields[1:]):
                want = example[key].numpy()
                if flip:
                    want = want[:, ::-1].copy()
                    if key == "normal":
                        want[..., 0] *= -1
                np.testing.assert_allclose(out[key].numpy(), want, atol=1e-6, err_msg=key)
    assert {round(s, 4) for s in scales} == {1.0, 1.2, 1.5}
    assert 15 < sum(flips) < 45
    # Same seed, same result.
    a = scenes.augment_example(example, fmt, tf.constant([1, 2], tf.int64))
    b = scenes.augment_example(example, fmt, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a["image"], b["image"])


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
    batch = next(iter(scenes.make_dataset(scenes.NYUV2, data, "val", 1, cache_dir=cache, verbose=False)))
    np.testing.assert_allclose(batch["image"], -0.5)


def broken(tmp_path, change):
    data = tmp_path / "data"
    write_folder(data, scenes.NYUV2, counts=(("train", 3), ("val", 2)))
    change(data)
    return data


BAD_INPUTS = {
    "missing root": (lambda d: None, "does not exist", "nowhere"),
    "missing split": (lambda d: os.rename(d / "val", d / "valid"), "missing nyuv2 split folder", "val"),
    "missing folder": (lambda d: [p.unlink() for p in (d / "train" / "normal").iterdir()]
                       and (d / "train" / "normal").rmdir(), "missing folder", "normal"),
    "count mismatch": (lambda d: (d / "train" / "depth" / "2.npy").unlink(), "different numbers of files", "train"),
    "gap in numbering": (lambda d: os.rename(d / "train" / "label" / "2.npy", d / "train" / "label" / "7.npy"),
                         "missing 2.npy", "label"),
    "wrong shape": (lambda d: np.save(d / "train" / "depth" / "1.npy", np.zeros((H, W + 1, 1), np.float32)),
                    "shape", "depth/1.npy"),
    "wrong dtype": (lambda d: np.save(d / "val" / "image" / "1.npy", np.zeros((H, W, 3), np.uint8)),
                    "dtype uint8", "image/1.npy"),
    "unreadable": (lambda d: (d / "train" / "normal" / "0.npy").write_bytes(b"not numpy"), "unreadable", "normal/0.npy"),
    "fractional labels": (lambda d: np.save(d / "train" / "label" / "0.npy", np.full((H, W), 0.5, np.float32)),
                          "not integers", "label/0.npy"),
    "labels out of range": (lambda d: np.save(d / "val" / "label" / "1.npy", np.full((H, W), 13, np.int64)),
                            "expected 0..12", "label/1.npy"),
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
    assert not any(p.name.startswith("incomplete") for p in cache.rglob("*")) if cache.exists() else True
    assert not any(cache.rglob("*.array_record*")) if cache.exists() else True


@pytest.mark.parametrize("kind", ["nyuv2", "cityscapes"])
def test_generated_scenes_go_through_the_same_builder(tmp_path, kind):
    from data_pipelines import synthetic

    root = synthetic.write_scenes(tmp_path / "scenes", kind=kind, num_train=5, num_val=2, height=24, width=32, seed=1)
    fmt = scenes.FORMATS[kind]
    batches = list(scenes.make_dataset(fmt, root, "train", 2, cache_dir=tmp_path / "cache", verbose=False))
    assert len(batches) == 2  # 5 examples, remainder dropped in training
    for batch in batches:
        assert batch["image"].shape == (2, 24, 32, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        for field in fmt.fields[1:]:
            value = batch[field.key]
            if field.kind == "label":
                assert value.dtype == np.int32 and value.min() >= -1 and value.max() < fmt.num_classes[field.key]
            elif field.kind == "depth":
                assert value.shape == (2, 24, 32, 1) and value.min() >= 0.0
            elif field.kind == "disp":
                assert ((value == -1.0) | (value > 0)).all()
            else:
                norms = np.linalg.norm(value, axis=-1)
                # Bilinear rescaling averages normals only across surface edges.
                assert norms.max() <= 1.0 + 1e-5
                assert np.mean((norms < 1e-6) | (np.abs(norms - 1.0) < 1e-5)) > 0.8
    # Unaugmented validation data equals the files, value for value.
    val = next(iter(scenes.make_dataset(fmt, root, "val", 2, cache_dir=tmp_path / "cache", verbose=False)))
    for field in fmt.fields:
        want = np.stack([np.load(root / "val" / field.folder / f"{i}.npy") for i in range(2)])
        got = val[field.key]
        if field.kind == "image":
            np.testing.assert_allclose(got, want * 2 - 1, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want.reshape(got.shape).astype(got.dtype))
