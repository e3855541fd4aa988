"""UTKFace pipeline (folder of named JPEGs -> tf.data): labels are checked against names
parsed here by hand, pixels against hand-computed normalisation, order/resume/shards
against the uninterrupted epoch, flips against np.fliplr."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import utkface
from data_pipelines.common import DataError

S = 16  # image_size in these tests: small and fast
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    tf.io.write_file(str(path), tf.io.encode_jpeg(pixels.astype(np.uint8), quality=100))


def labels_by_hand(path: Path) -> tuple[int, int, int]:
    """(age bin, gender, race) from '{age}_{gender}_{race}_...' with the bins spelled out."""
    age, gender, race = (int(x) for x in path.name.split("_")[:3])
    bins = [(0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 10**6)]
    age_class = next(k for k, (lo, hi) in enumerate(bins) if lo <= age <= hi)
    return age_class, gender, race


def listing(root: Path):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def collect(ds):
    batches = list(ds)
    return batches, {
        k: np.concatenate([b[k] for b in batches]) for k in batches[0]
    } if batches else {}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("utk") / "UTKFace"
    utkface.write_fake_utkface(root, 30, seed=3, size=24)
    return root


def test_age_bins_and_both_name_forms(tmp_path):
    ages = {9: 0, 10: 1, 0: 0, 19: 1, 59: 5, 60: 6, 116: 6}
    for i, age in enumerate(ages):
        suffix = ".jpg.chip.jpg" if i % 2 else ".jpg"
        write_jpeg(
            tmp_path / f"{age}_{i % 2}_{i % 5}_2017010{i}000000000{suffix}", np.full((8, 8, 3), 99)
        )
    paths, labels = utkface.list_examples(tmp_path)
    assert [p.name for p in paths] == sorted(p.name for p in tmp_path.iterdir())
    got = {int(p.name.split("_")[0]): int(a) for p, a in zip(paths, labels["age"])}
    assert got == ages
    for p, g, r in zip(paths, labels["gender"], labels["ethnicity"]):
        assert labels_by_hand(p)[1:] == (g, r)
    assert all(labels[k].dtype == np.int32 for k in ("age", "gender", "ethnicity"))
    assert [utkface.age_bin(a) for a in (9, 10, 59, 60, 116)] == [0, 1, 5, 6, 6]


def test_split_is_fixed_disjoint_covering_80_20(fake):
    for n in (30, 7, 23705):
        train, test = utkface.split_indices(n, "train"), utkface.split_indices(n, "test")
        assert len(train) == int(0.8 * n) and len(train) + len(test) == n
        assert not set(train) & set(test) and set(train) | set(test) == set(range(n))
        np.testing.assert_array_equal(train, utkface.split_indices(n, "train"))  # stable
        np.testing.assert_array_equal(utkface.split_indices(n, "val"), test)  # alias
        assert not np.array_equal(train, np.arange(len(train)))  # permuted, not the first names
    with pytest.raises(ValueError, match="'train', 'test', 'val'"):
        utkface.split_indices(30, "validation")
    # The pipeline reads exactly these files (no drop, so every example shows up).
    paths, _ = utkface.list_examples(fake)
    for split in ("train", "test"):
        ds = utkface.make_dataset(fake, split, 4, drop_remainder=False, image_size=S)
        assert sorted(ds.files) == [paths[i] for i in utkface.split_indices(30, split)]


def test_batches_shapes_dtypes_labels(fake):
    before = listing(fake)
    ds = utkface.make_dataset(
        fake, "train", 5, image_size=S
    )  # 24 train: 4 full batches and one of 4
    batches, all_ = collect(ds)
    assert len(ds) == len(batches) == 5 and [len(b["age"]) for b in batches] == [5, 5, 5, 5, 4]
    assert len(utkface.make_dataset(fake, "train", 5, image_size=S, drop_remainder=True)) == 4
    for b in batches:
        assert set(b) == {"image", "age", "gender", "ethnicity"}
        size = len(b["age"])
        assert b["image"].shape == (size, S, S, 3) and b["image"].dtype == np.float32
        for k in ("age", "gender", "ethnicity"):
            assert isinstance(b[k], np.ndarray) and b[k].shape == (size,) and b[k].dtype == np.int32
    want = np.array([labels_by_hand(p) for p in ds.files])
    np.testing.assert_array_equal(
        np.stack([all_["age"], all_["gender"], all_["ethnicity"]], 1), want
    )
    test = utkface.make_dataset(fake, "val", 4, image_size=24)  # 6 test: remainder kept
    batches = list(test)
    assert [b["image"].shape for b in batches] == [(4, 24, 24, 3), (2, 24, 24, 3)]
    assert listing(fake) == before  # only read


def test_normalisation_of_a_solid_colour(tmp_path):
    colour = np.array([200, 100, 50])
    for i in range(5):
        write_jpeg(
            tmp_path / f"3{i}_0_1_2017010100000000{i}.jpg", np.broadcast_to(colour, (40, 40, 3))
        )
    expected = (colour / 255.0 - MEAN) / STD  # about [1.307, -0.282, -0.930]
    for split in ("train", "test"):
        for b in utkface.make_dataset(tmp_path, split, 1, image_size=S):
            # JPEG (YCbCr rounding) may move a solid colour by a couple of levels.
            np.testing.assert_allclose(
                b["image"], np.broadcast_to(expected, (1, S, S, 3)), atol=2.5 / 255 / 0.224
            )


def test_order_depends_on_seed_and_epoch_only(fake):
    def run(**kw):
        ds = utkface.make_dataset(fake, "train", 4, image_size=S, **kw)
        return ds.files, collect(ds)[1]

    files_a, a = run(seed=1, epoch=0)
    files_b, b = run(seed=1, epoch=0)
    assert files_a == files_b
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    files_c, _ = run(seed=1, epoch=1)
    files_d, _ = run(seed=2, epoch=0)
    assert files_c != files_a and sorted(files_c) == sorted(files_a)
    assert files_d != files_a
    # test split: file-name order whatever the seed / epoch
    test = utkface.make_dataset(fake, "test", 4, seed=5, epoch=3, image_size=S)
    assert test.files == sorted(test.files)


@pytest.mark.parametrize("augment", [False, True])
def test_start_step_resumes_exactly(fake, augment):
    full = list(
        utkface.make_dataset(fake, "train", 4, augment=augment, seed=7, epoch=2, image_size=S)
    )
    assert len(full) == 6
    for k in (0, 2, 6):
        resumed = utkface.make_dataset(
            fake, "train", 4, augment=augment, seed=7, epoch=2, start_step=k, image_size=S
        )
        got = list(resumed)
        assert len(resumed) == len(got) == 6 - k
        for x, y in zip(got, full[k:]):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="start_step"):
        utkface.make_dataset(fake, "train", 4, start_step=7, image_size=S)
    with pytest.raises(ValueError, match="batch_size"):
        utkface.make_dataset(fake, "train", 0, image_size=S)


@pytest.mark.parametrize("split,count", [("train", 2), ("train", 3), ("test", 3)])
def test_process_shards_are_disjoint_and_cover(fake, split, count):
    paths, _ = utkface.list_examples(fake)
    members = {paths[i] for i in utkface.split_indices(30, split)}
    seen, sizes = [], []
    for index in range(count):
        ds = utkface.make_dataset(
            fake,
            split,
            2,
            seed=4,
            drop_remainder=False,
            image_size=S,
            process_index=index,
            process_count=count,
        )
        _, all_ = collect(ds)
        np.testing.assert_array_equal(all_["gender"], [labels_by_hand(p)[1] for p in ds.files])
        seen += ds.files
        sizes.append(len(ds.files))
    assert len(seen) == len(set(seen)) and set(seen) == members
    assert max(sizes) - min(sizes) <= 1
    # Dropping remainders, every process takes the same number of steps.
    steps = {
        len(
            list(
                utkface.make_dataset(
                    fake,
                    split,
                    3,
                    drop_remainder=True,
                    image_size=S,
                    process_index=i,
                    process_count=count,
                )
            )
        )
        for i in range(count)
    }
    assert len(steps) == 1


def test_flip_flips_half_the_examples(fake):
    kw = dict(seed=11, epoch=1, image_size=S)
    plain = utkface.make_dataset(fake, "train", 24, augment=False, **kw)
    aug = utkface.make_dataset(fake, "train", 24, augment=True, **kw)
    assert plain.files == aug.files
    default = utkface.make_dataset(
        fake, "train", 24, **kw
    )  # the training split augments by default
    np.testing.assert_array_equal(next(iter(default))["image"], next(iter(aug))["image"])
    x, y = next(iter(plain))["image"], next(iter(aug))["image"]
    flipped = np.array([not np.array_equal(a, b) for a, b in zip(x, y)])
    for a, b, f in zip(x, y, flipped):
        np.testing.assert_array_equal(b, np.fliplr(a) if f else a)
        assert not np.allclose(a, np.fliplr(a))  # noise: a flip is visible
    assert 4 <= flipped.sum() <= 20  # 24 fair coins
    np.testing.assert_array_equal(flipped, utkface.flip_flags(aug.indices, 11, 1))
    assert not np.array_equal(flipped, utkface.flip_flags(aug.indices, 11, 2))


def _one_line_naming(error, path):
    text = str(error.value)
    assert str(path) in text and "\n" not in text, text


def test_clear_errors(tmp_path):
    with pytest.raises(DataError) as e:
        utkface.make_dataset(tmp_path / "missing", "train", 4)
    _one_line_naming(e, tmp_path / "missing")

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "UTKFace").mkdir()
    with pytest.raises(DataError, match="no UTKFace images") as e:
        utkface.list_examples(junk)
    _one_line_naming(e, junk)
    assert "UTKFace" in str(e.value).split(":", 1)[1]  # hints at the subfolder

    for name in ("30_2_0_20170101000000000.jpg", "30_1_5_20170101000000000.jpg.chip.jpg"):
        bad = tmp_path / f"bad_{name[:6]}"
        bad.mkdir()
        write_jpeg(bad / name, np.zeros((8, 8, 3)))
        with pytest.raises(DataError) as e:
            utkface.list_examples(bad)
        _one_line_naming(e, bad / name)


def test_unmatched_names_are_reported_in_one_plain_line(tmp_path, capsys):
    import warnings

    root = tmp_path / "data"
    utkface.write_fake_utkface(root, 5)
    (root / "readme.txt").write_text("x")
    (root / "61_1_20170109150557335.jpg.chip.jpg").write_bytes(b"real UTKFace has names like this")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning (with its source line) would fail here
        paths, _ = utkface.list_examples(root)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"note: {root}: skipped 2 file(s)")
    assert "'61_1_20170109150557335.jpg.chip.jpg'" in err
    assert len(paths) == 5
    with pytest.raises(DataError, match="not an empty folder"):
        utkface.write_fake_utkface(root, 1)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_names_the_file(tmp_path, damage):
    root = tmp_path / "data"
    utkface.write_fake_utkface(root, 9, size=24)
    bad = root / "30_1_2_20170101999999999.jpg"
    if damage == "garbage":
        bad.write_bytes(os.urandom(300))
    else:
        good = sorted(root.glob("*.jpg"))[0].read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    paths, _ = utkface.list_examples(root)
    split = "train" if paths.index(bad) in utkface.split_indices(len(paths), "train") else "test"
    ds = utkface.make_dataset(root, split, 1, drop_remainder=False, image_size=S)
    with pytest.raises(DataError, match="unreadable JPEG") as e:
        list(ds)
    _one_line_naming(e, bad)
