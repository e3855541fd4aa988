"""MultiDigits: every pair is rebuilt here from load_digits() (labels, pixels, positions),
and the pipeline's order / resume / shards are checked against the uninterrupted epoch."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from data_pipelines import multidigits

DIGITS = load_digits()


def test_source_split_is_fixed_disjoint_80_20():
    train, test = multidigits.source_indices("train"), multidigits.source_indices("test")
    assert len(DIGITS.target) == 1797 and (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test) and set(train) | set(test) == set(range(1797))
    np.testing.assert_array_equal(train, multidigits.source_indices("train"))
    np.testing.assert_array_equal(test, multidigits.source_indices("val"))
    assert set(DIGITS.target[test]) == set(range(10))


@pytest.mark.parametrize(
    "split,n,height,width", [("train", 400, 12, 24), ("test", 300, 12, 24), ("test", 50, 16, 40)]
)
def test_pairs_rebuilt_from_their_source_digits(split, n, height, width):
    pairs = multidigits.build_pairs(split, num_pairs=n, seed=1, height=height, width=width)
    image = pairs["image"]
    assert image.shape == (n, height, width, 1) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    for key in ("left", "right"):
        assert pairs[key].shape == (n,) and pairs[key].dtype == np.int32
        np.testing.assert_array_equal(pairs[key], DIGITS.target[pairs[f"{key}_index"]])
        assert set(pairs[f"{key}_index"]) <= set(multidigits.source_indices(split))
    half = width // 2
    centre_row, centre_col = (height - 8) // 2, (half - 8) // 2
    for i in range(n):
        rest = image[i, :, :, 0].copy()
        for key, first_col in (("left", 0), ("right", half)):
            row, col = pairs[f"{key}_pos"][i]
            # inside its own half, jittered at most 2 px from the half's centre
            assert first_col <= col and col + 8 <= first_col + half
            assert abs(row - centre_row) <= 2 and abs(col - first_col - centre_col) <= 2
            digit = DIGITS.images[pairs[f"{key}_index"][i]] / 16.0
            np.testing.assert_allclose(image[i, row : row + 8, col : col + 8, 0], digit, atol=1e-7)
            rest[row : row + 8, col : col + 8] = 0.0
        assert not rest.any()  # nothing else on the canvas
    jitter = pairs["left_pos"] - [centre_row, centre_col]
    assert set(np.unique(jitter)) == {-2, -1, 0, 1, 2}  # all offsets used
    assert set(pairs["left"]) == set(range(10))


def test_pairs_are_deterministic_and_seeded():
    a = multidigits.build_pairs("train", num_pairs=100, seed=0)
    b = multidigits.build_pairs("train", num_pairs=100, seed=0)
    c = multidigits.build_pairs("train", num_pairs=100, seed=1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["left_index"], c["left_index"])
    sizes = {s: len(multidigits.build_pairs(s)["left"]) for s in ("train", "test")}
    assert sizes == {"train": 10000, "test": 2000}
    with pytest.raises(ValueError, match="'train', 'test', 'val'"):
        multidigits.build_pairs("validation")
    with pytest.raises(ValueError, match="too small"):
        multidigits.build_pairs("train", height=7)


def test_batches_shapes_scaling_and_labels():
    pairs = multidigits.build_pairs("test", num_pairs=50)
    ds = multidigits.make_dataset(None, "test", 16, num_pairs=50)  # remainder kept for test
    batches = list(ds)
    assert len(ds) == len(batches) == 4 and [len(b["left"]) for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(ds.indices, np.arange(50))  # test: pair order
    for b in batches:
        assert set(b) == {"image", "left", "right"}
        assert b["image"].dtype == np.float32 and b["image"].shape[1:] == (12, 24, 1)
        assert b["left"].dtype == b["right"].dtype == np.int32
    image = np.concatenate([b["image"] for b in batches])
    np.testing.assert_allclose(image, pairs["image"] * 2 - 1, atol=1e-6)
    assert image.min() == -1.0 and image.max() == 1.0
    np.testing.assert_array_equal(
        np.concatenate([b["left"] for b in batches]), DIGITS.target[pairs["left_index"]]
    )

    train = multidigits.make_dataset(
        None, "train", 64, num_pairs=200
    )  # 3 full batches and a short one of 8
    batches = list(train)
    assert [b["image"].shape for b in batches] == [(64, 12, 24, 1)] * 3 + [(8, 12, 24, 1)]
    assert (
        len(list(multidigits.make_dataset(None, "train", 64, num_pairs=200, drop_remainder=True)))
        == 3
    )
    rows = train.indices
    np.testing.assert_array_equal(
        np.concatenate([b["right"] for b in batches]),
        DIGITS.target[multidigits.build_pairs("train", num_pairs=200)["right_index"][rows]],
    )


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_order_resume_and_augment_noop():
    run = lambda **kw: list(multidigits.make_dataset(None, "train", 32, num_pairs=300, **kw))  # noqa: E731
    full = run(seed=3, epoch=1)
    _same(full, run(seed=3, epoch=1))
    _same(full, run(seed=3, epoch=1, augment=True))  # accepted, does nothing
    other = run(seed=3, epoch=2)
    assert not np.array_equal(full[0]["left"], other[0]["left"]) or not np.array_equal(
        full[0]["image"], other[0]["image"]
    )
    for k in (1, 4, 9):
        _same(run(seed=3, epoch=1, start_step=k), full[k:])
    with pytest.raises(ValueError, match="start_step"):  # 300 pairs: 10 batches, the last short
        multidigits.make_dataset(None, "train", 32, num_pairs=300, start_step=11)
    with pytest.raises(ValueError, match="batch_size"):
        multidigits.make_dataset(None, "train", 0, num_pairs=300)


@pytest.mark.parametrize("split,count", [("train", 2), ("train", 3), ("test", 3)])
def test_process_shards_are_disjoint_and_cover(split, count):
    n = 301
    pairs = multidigits.build_pairs(split, num_pairs=n)
    seen = []
    for index in range(count):
        ds = multidigits.make_dataset(
            None,
            split,
            8,
            num_pairs=n,
            drop_remainder=False,
            seed=5,
            process_index=index,
            process_count=count,
        )
        got = np.concatenate([b["left"] for b in ds])
        np.testing.assert_array_equal(got, pairs["left"][ds.indices])
        seen += list(ds.indices)
    assert len(seen) == len(set(seen)) == n
    steps = {
        len(
            list(
                multidigits.make_dataset(
                    None,
                    split,
                    8,
                    num_pairs=n,
                    process_index=i,
                    process_count=count,
                    drop_remainder=True,
                )
            )
        )
        for i in range(count)
    }
    assert len(steps) == 1
