"""Pascal-Context: the saliency and edge kinds against brute force, the PASCAL-MT reader
against files written by hand, the pipeline against the files it read, one-line errors,
and the entry point on built-in data."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import io as scipy_io
from scipy import ndimage

from data_pipelines import pascal, pascal_synthetic
from data_pipelines.common import DataError
from dgr_jax import tasks as task_lib

SALIENCY = task_lib.Task("saliency", 1, "saliency", -1)
EDGE = task_lib.Task("edge", 1, "edge", -1)


def run_stats(task, logits, labels, batches=2):
    kind = task.record
    stats = kind.init_stats(task)
    update = jax.jit(lambda s, p, t: kind.update_stats(task, s, p, t))
    for p, t in zip(np.array_split(logits, batches), np.array_split(labels, batches)):
        stats = update(stats, jnp.asarray(p), jnp.asarray(t))
    return kind.finalize(task, jax.device_get(stats))


def test_saliency_metrics_equal_a_per_image_loop():
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=(6, 9, 11)) < 0.4).astype(np.int32)
    labels[rng.uniform(size=labels.shape) < 0.1] = -1
    labels[3] = 0  # an image without salient pixels
    labels[4] = -1  # an image without labelled pixels: not counted
    logits = rng.normal(size=labels.shape + (1,)) * 2
    probability = 1 / (1 + np.exp(-logits[..., 0]))
    iou, precision, recall = [], [], []
    for image in range(6):
        valid = labels[image] != -1
        if not valid.any():
            continue
        truth = labels[image][valid] == 1
        row_i, row_p, row_r = [], [], []
        for t in np.linspace(0.2, 0.9, 15):
            pred = probability[image][valid] > t
            tp, fp, fn = np.sum(pred & truth), np.sum(pred & ~truth), np.sum(~pred & truth)
            row_i.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
            row_p.append(tp / (tp + fp) if tp + fp else float(tp + fn == 0))
            row_r.append(tp / (tp + fn) if tp + fn else 1.0)
        iou.append(row_i), precision.append(row_p), recall.append(row_r)
    mean_p, mean_r = np.mean(precision, 0), np.mean(recall, 0)
    f = 2 * mean_p * mean_r / (mean_p + mean_r)
    metrics = run_stats(SALIENCY, logits, labels, batches=3)
    assert metrics["miou"] == pytest.approx(np.max(np.mean(iou, 0)), abs=1e-6)
    assert metrics["maxf"] == pytest.approx(np.max(f), abs=1e-6)


def test_edge_odsf_equals_a_distance_transform_count():
    rng = np.random.default_rng(1)
    batch, height, width = 4, 40, 52
    labels = np.zeros((batch, height, width), np.int32)
    for image in range(batch):  # a few one-pixel contours
        for _ in range(3):
            r, c = rng.integers(5, height - 5), rng.integers(5, width - 5)
            labels[image, r, max(c - 8, 0) : c + 8] = 1
            labels[image, max(r - 6, 0) : r + 6, c] = 1
    labels[:, :, -6:] = -1  # padding
    # probabilities on bin centres, so thresholds k / 100 are not ambiguous
    probability = (rng.integers(0, 100, size=labels.shape) + 0.5) / 100
    near = ndimage.binary_dilation(labels == 1, iterations=2)
    probability[near] = np.minimum(probability[near] + 0.3, 0.995)
    logits = np.log(probability / (1 - probability))[..., None]
    radius = 0.0075 * math.hypot(height, width)
    valid, truth = labels != -1, labels == 1
    best = 0.0
    for k in range(1, 100):
        matched = predicted = recalled = 0
        for image in range(batch):
            pred = (probability[image] >= k / 100) & valid[image]
            to_truth = ndimage.distance_transform_edt(~truth[image])
            matched += np.sum(pred & (to_truth <= radius))
            predicted += np.sum(pred)
            to_pred = (
                ndimage.distance_transform_edt(~pred) if pred.any() else np.full(pred.shape, np.inf)
            )
            recalled += np.sum(truth[image] & (to_pred <= radius))
        p = matched / predicted if predicted else 1.0
        r = recalled / truth.sum()
        best = max(best, 2 * p * r / (p + r) if p + r else 0.0)
    metrics = run_stats(EDGE, logits.astype(np.float32), labels)
    assert metrics["odsf"] == pytest.approx(best, abs=1e-9)
    assert 0.0 < metrics["ods_threshold"] < 1.0


@pytest.mark.parametrize("task, pos_weight", [(SALIENCY, None), (EDGE, 0.95)])
def test_balanced_cross_entropy_is_hed_s_weighting(task, pos_weight):
    rng = np.random.default_rng(2)
    labels = (rng.uniform(size=(2, 5, 7)) < 0.3).astype(np.int32)
    labels[0, 0] = -1
    logits = rng.normal(size=labels.shape + (1,)) * 3
    x, valid = logits[..., 0].astype(np.float64), labels != -1
    pos, neg = (labels == 1) & valid, (labels == 0) & valid
    w = neg.sum() / valid.sum() if pos_weight is None else pos_weight
    log_sigmoid = -np.log1p(np.exp(-x))
    log_one_minus = -np.log1p(np.exp(x))
    expected = -(w * log_sigmoid[pos].sum() + (1 - w) * log_one_minus[neg].sum()) / valid.sum()
    value = task.loss(jnp.asarray(logits), jnp.asarray(labels))  # float64 (conftest)
    assert float(value) == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------
# The reader


def write_parts_mat(path, shape, objects):
    """``objects``: (class_ind, {part_name: mask}) pairs, in PASCAL-Part's struct layout."""
    records = np.empty(
        (1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    for i, (class_ind, parts) in enumerate(objects):
        if parts:
            part_records = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, mask) in enumerate(parts.items()):
                part_records[0, j] = (name, mask.astype(np.uint8))
            mask = np.any(list(parts.values()), axis=0)
        else:
            part_records, mask = np.zeros((0, 0)), np.ones(shape, bool)
        records[0, i] = ("x", np.uint8(class_ind), mask.astype(np.uint8), part_records)
    scipy_io.savemat(path, {"anno": {"imname": "x", "objects": records}})


def test_human_parts_group_the_six_parts_of_people_only(tmp_path):
    shape = (6, 8)
    head, foot, torso, cow_leg = (np.zeros(shape, bool) for _ in range(4))
    head[0, :2], foot[5, 6:], torso[2:4, 3], cow_leg[1, 5] = True, True, True, True
    path = tmp_path / "a.mat"
    write_parts_mat(
        path, shape, [(15, {"head": head, "rfoot": foot, "torso": torso}), (10, {"lleg": cow_leg})]
    )
    expected = np.zeros(shape, np.uint8)
    expected[head], expected[foot], expected[torso] = 1, 6, 2
    np.testing.assert_array_equal(pascal.read_human_parts(path, shape), expected)
    write_parts_mat(path, shape, [(15, {}), (10, {"lleg": cow_leg})])  # a person without parts
    np.testing.assert_array_equal(pascal.read_human_parts(path, shape), np.full(shape, 255))


def test_edges_are_the_thinned_boundary_of_the_context_labels():
    labels = np.ones((7, 10), np.int32)
    labels[:, 6:] = 2
    edges = pascal.edges_from_context(labels)
    # the two-pixel-wide Laplacian band thinned to one pixel per row (thinning may take
    # the band's ends), on either side of the boundary
    assert np.all(edges.sum(axis=1) <= 1) and edges.sum() >= 5
    assert set(np.nonzero(edges)[1]) <= {5, 6}
    assert not pascal.edges_from_context(np.full((5, 5), 3)).any()


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    root = pascal_synthetic.write_synthetic(tmp_path_factory.mktemp("pmt"), 6, 3, 30, 40, seed=3)
    source = pascal.PascalSource(
        root, crop=40, cache_dir=tmp_path_factory.mktemp("tfds"), verbose=False
    )
    return root, source


def test_evaluation_batches_are_the_files_on_a_padded_canvas(built_in):
    root, source = built_in
    batch = next(iter(source.dataset("val", 3)))
    ids = pascal.split_ids(root, "val")
    assert batch["image"].shape == (3, 40, 40, 3)
    for row, image_id in enumerate(ids):
        paths = pascal.example_paths(root, image_id)
        image = np.asarray(Image.open(paths["image"]).convert("RGB"), np.float64)
        h, w = image.shape[:2]
        np.testing.assert_allclose(
            batch["image"][row, :h, :w], (image / 255 - pascal.MEAN) / pascal.STD, atol=1e-5
        )
        assert np.all(batch["image"][row, h:] == 0) and np.all(batch["seg"][row, h:] == -1)
        seg = np.asarray(Image.open(paths["seg"])).astype(np.int32)
        np.testing.assert_array_equal(batch["seg"][row, :h, :w], np.where(seg == 255, -1, seg))
        sal = np.asarray(Image.open(paths["saliency"]).convert("L"))
        np.testing.assert_array_equal(
            batch["saliency"][row, :h, :w], (sal > 127.5).astype(np.int32)
        )
        context = scipy_io.loadmat(paths["context"])["LabelMap"]
        raw = np.asarray(Image.open(paths["normal"]).convert("RGB"), np.float64) * 2 / 255 - 1
        raw /= np.linalg.norm(raw, axis=-1, keepdims=True)
        keep = np.isin(context, sorted(pascal.NORMAL_VALID_CLASSES))
        np.testing.assert_allclose(
            batch["normal"][row, :h, :w], np.where(keep[..., None], raw, 0), atol=1e-6
        )
        assert batch["edge"][row, :h, :w].sum() == pascal.edges_from_context(context).sum()


def test_training_batches_are_seeded_crops_with_valid_targets(built_in):
    _, source = built_in
    first = next(iter(source.dataset("train", 3, seed=5, epoch=1)))
    again = next(iter(source.dataset("train", 3, seed=5, epoch=1)))
    other = next(iter(source.dataset("train", 3, seed=5, epoch=2)))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["index"], other["index"]) or not np.array_equal(
        first["image"], other["image"]
    )
    assert first["image"].shape == (3, 40, 40, 3)
    assert set(np.unique(first["saliency"])) <= {-1, 0, 1}
    assert set(np.unique(first["human_parts"])) <= set(range(-1, 7))
    norms = np.linalg.norm(first["normal"], axis=-1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


def test_missing_and_malformed_files_are_one_line_errors(tmp_path):
    root = pascal_synthetic.write_synthetic(tmp_path / "pmt", 2, 1, 16, 16)
    (root / "sal_distill" / "2008_000001.png").unlink()
    with pytest.raises(DataError, match=r"2008_000001\.png: missing \(saliency of 2008_000001"):
        pascal.scan(root)
    (root / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val\.txt: missing Pascal-Context val list"):
        pascal.scan(root)
    root = pascal_synthetic.write_synthetic(tmp_path / "pmt2", 1, 1, 16, 16)
    Image.fromarray(np.full((16, 16), 30, np.uint8)).save(
        root / "semseg" / "pascal-context" / "2008_000000.png"
    )
    with pytest.raises(DataError, match=r"2008_000000\.png: (shape|labels outside)"):
        pascal.load_example(root, "2008_000000")


def test_entry_point_trains_and_reports_the_paper_rows(tmp_path, capsys, private_cache):
    from experiments import pascal as entry

    workdir = tmp_path / "run"
    argv = [
        "--synthetic",
        "--synthetic_size",
        "24x32",
        "--synthetic_counts",
        "4,2",
        "--base_width",
        "4",
        "--head_width",
        "8",
        "--batch_size",
        "2",
        "--steps",
        "1",
        "--dgr_weight",
        "0",
        "--workdir",
        str(workdir),
        "--no_progress",
    ]
    entry.main(argv)
    summary = json.loads((workdir / "summary.json").read_text())
    keys = {
        "seg/miou",
        "human_parts/miou",
        "normal/mean_angle",
        "saliency/miou",
        "saliency/maxf",
        "edge/odsf",
    }
    assert keys <= set(summary["metrics"])
    table = (workdir / "results.md").read_text()
    assert "| paper: Vanilla | 0.6380 | 0.5860 | 14.9000 | 0.6510 | 0.6920 | -2.86% |" in table
    broken = pascal_synthetic.write_synthetic(tmp_path / "broken", 2, 1, 16, 16)
    (broken / "human_parts" / "2008_000002.mat").unlink()
    for folder, message in [
        (tmp_path / "nowhere", "nowhere: no such folder"),
        (
            broken,
            "2008_000002.mat: missing (human_parts of 2008_000002, listed in ImageSets/Context/val.txt",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            entry.main(
                ["--data_dir", str(folder), "--workdir", str(tmp_path / "r2"), "--no_progress"]
            )
        text = str(exit_info.value.code)
        assert message in text and "\n" not in text, text
    assert not (tmp_path / "r2").exists()


def test_dry_run_counts_five_full_size_heads(capsys):
    from experiments import pascal as entry

    entry.main(["--dry_run"])
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    head = 16_125_440  # a DeepLabV3 head without its classifier
    heads = 5 * head + 257 * (21 + 7 + 3 + 1 + 1)
    assert counts == {
        "encoder_params": 23_508_032,
        "head_params": heads,
        "dummy_params": 3 * heads,
        "total_params": 23_508_032 + 4 * heads,
    }
