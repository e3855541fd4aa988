"""ImageNet through TFDS's real imagenet2012 builder on tiny archives in the ILSVRC2012
format: labels against TFDS's label files read here, pixels against PIL's resize and
crop (torchvision's transforms, written out), crop windows against their bounds and
hand-worked fallbacks, order / resume / shards against the uninterrupted epoch; the
pipeline on TFDS's mock data; the run end to end; the full-size parameter counts."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import imagenet
from data_pipelines.common import DataError
from experiments import datasets
from experiments import imagenet as entry

S = 32  # crop side in these tests
R = 36  # the shorter side before the evaluation crop: 32 * 256 // 224
HEIGHT, WIDTH = 40, 55  # the fake JPEGs
NUM_TRAIN, NUM_VAL = 30, 10
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
TFDS_LABELS = Path(tfds.__file__).parent / "datasets" / "imagenet2012"


def tfds_file(name: str) -> list[str]:
    return (TFDS_LABELS / name).read_text().split()


def listing(root: Path):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def fake(private_cache):
    """The built-in archives (as ``--synthetic`` writes them) and their prepared source."""
    root = datasets._fake_imagenet_root(imagenet, NUM_TRAIN, NUM_VAL, HEIGHT, WIDTH)
    before = listing(root)
    source = imagenet.open_source(root, image_size=S, verbose=False)
    assert listing(root) == before  # the folder is only read
    return root, source


def jpeg_of(root: Path, name: str) -> np.ndarray:
    """The named JPEG from the archives, decoded by PIL (float64 RGB)."""
    if name.startswith("ILSVRC2012_val_"):
        with tarfile.open(root / "ILSVRC2012_img_val.tar") as tar:
            data = tar.extractfile(name).read()
    else:
        with tarfile.open(root / "ILSVRC2012_img_train.tar") as tar:
            inner = io.BytesIO(tar.extractfile(name.split("_")[0] + ".tar").read())
        with tarfile.open(fileobj=inner) as tar:
            data = tar.extractfile(name).read()
    return Image.open(io.BytesIO(data)).convert("RGB")


def normalised(pixels) -> np.ndarray:
    return (np.asarray(pixels, np.float64) / 255.0 - MEAN) / STD


def collect(ds):
    batches = list(ds)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_fake_archives_have_the_real_layout(fake):
    root, _ = fake
    val_synsets = tfds_file("validation_labels.txt")[:NUM_VAL]
    with tarfile.open(root / "ILSVRC2012_img_val.tar") as tar:
        assert sorted(tar.getnames()) == [
            f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, NUM_VAL + 1)
        ]
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as tar:
        outer = tar.getnames()
        assert sorted(outer) == sorted(f"{s}.tar" for s in set(val_synsets))
        for name in outer:
            with tarfile.open(fileobj=io.BytesIO(tar.extractfile(name).read())) as inner:
                members = inner.getnames()
            assert members and all(
                m.startswith(name[:-4] + "_") and m.endswith(".JPEG") for m in members
            )
    assert jpeg_of(root, "ILSVRC2012_val_00000001.JPEG").size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_labels_are_the_synsets_index_in_tfds_label_file(fake, split):
    root, source = fake
    classes = {s: i for i, s in enumerate(tfds_file("labels.txt"))}
    val_synsets = tfds_file("validation_labels.txt")
    ds = source.dataset(split, 4, augment=False, shuffle=False)
    got = collect(ds)
    n = len(got["label"])
    assert n == source.num_examples(split) and len(ds) == -(-n // 4)
    assert n == (NUM_VAL if split == "validation" else 3 * NUM_VAL)  # ceil(30 / 10) per synset
    np.testing.assert_array_equal(got["index"], np.arange(n))
    assert got["label"].dtype == np.int32 and got["index"].dtype == np.int64
    assert got["image"].shape == (n, S, S, 3) and got["image"].dtype == np.float32
    names = [source.file_name(split, i) for i in got["index"]]
    if split == "train":
        want = [classes[name.split("_")[0]] for name in names]
    else:
        want = [classes[val_synsets[int(name[-13:-5]) - 1]] for name in names]
    np.testing.assert_array_equal(got["label"], want)
    assert len(set(names)) == n
    assert len(source.dataset("val", 4)) == -(-NUM_VAL // 4)  # the alias


def test_eval_is_resize_shorter_side_then_centre_crop(fake):
    root, source = fake
    got = collect(source.dataset("validation", 4))
    # torchvision: Resize(36) -> 36 x int(36 * 55 / 40) = 36 x int(49.5) = 36 x 49;
    # CenterCrop(32) at (round(4 / 2), round(17 / 2)) = (2, 8), Python rounding half to even.
    assert (int(R * WIDTH / HEIGHT), round((49 - S) / 2)) == (49, 8)
    for image, index in zip(got["image"], got["index"]):
        pil = jpeg_of(root, source.file_name("validation", index))
        resized = pil.resize((49, 36), Image.BILINEAR)
        want = normalised(np.asarray(resized)[2 : 2 + S, 8 : 8 + S])
        # PIL rounds its output to uint8 and filters in fixed point: at most one level.
        np.testing.assert_allclose(image, want, atol=1.01 / 255 / STD.min(), rtol=0)


def test_train_is_the_seeded_random_resized_crop_and_flip(fake):
    root, source = fake
    got = collect(source.dataset("train", 8, seed=3, epoch=1))
    flips, windows = [], []
    for image, index in zip(got["image"], got["index"]):
        pil = jpeg_of(root, source.file_name("train", index))
        top, left, h, w, flip = imagenet.train_crop(3, 1, index, HEIGHT, WIDTH)
        windows.append((top, left, h, w))
        flips.append(flip)
        assert 0 <= top and top + h <= HEIGHT and 0 <= left and left + w <= WIDTH
        crop = np.asarray(pil.crop((left, top, left + w, top + h)).resize((S, S), Image.BILINEAR))
        want = normalised(crop[:, ::-1] if flip else crop)
        other = normalised(crop if flip else crop[:, ::-1])
        error = np.abs(image - want) * STD * 255  # in grey levels
        # decode_and_crop_jpeg upsamples chroma at the window's edge a little differently
        # from PIL's whole-image decode; elsewhere they agree to PIL's rounding.
        assert error.mean() < 0.6 and error.max() < 8, (index, error.mean(), error.max())
        assert (np.abs(image - other) * STD * 255).mean() > 3 * error.mean()
    assert 0 < sum(flips) < len(flips)
    assert len(set(windows)) > len(windows) // 2
    again = [imagenet.train_crop(3, 2, i, HEIGHT, WIDTH)[:4] for i in got["index"]]
    assert sum(a != b for a, b in zip(again, windows)) > len(windows) // 2  # new epoch, new crops


def test_crop_windows_by_hand():
    areas, ratios = [], []
    for index in range(150):
        top, left, h, w, _ = imagenet.train_crop(0, 0, index, 300, 400)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        areas.append(h * w / (300 * 400))
        ratios.append(w / h)
    # Sizes are rounded to pixels, so the bounds hold to within a pixel's worth.
    assert 0.08 * 0.98 < min(areas) and max(areas) <= 1.0
    assert 0.75 * 0.98 < min(ratios) and max(ratios) < 4 / 3 * 1.02
    # The first attempt that fits: its mean area from torchvision's algorithm in numpy.
    rng = np.random.default_rng(0)
    area = 300 * 400 * rng.uniform(0.08, 1.0, (20000, 10))
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (20000, 10)))
    w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (w <= 400) & (h <= 300)
    first = np.argmax(fits, axis=1)
    chosen = (w * h)[np.arange(20000), first][fits.any(axis=1)] / (300 * 400)
    assert np.mean(areas) == pytest.approx(chosen.mean(), abs=0.06)  # 3 standard errors
    # No attempt fits a 10x200 strip (area >= 160 at ratio <= 4/3 needs h >= 11): the
    # fallback is the centred crop of ratio 4/3, h 10, w round(13.33) = 13, left 187 // 2.
    assert imagenet.train_crop(0, 0, 5, 10, 200)[:4] == (0, 93, 10, 13)
    assert imagenet.train_crop(0, 0, 5, 200, 10)[:4] == (93, 0, 13, 10)
    assert imagenet.train_crop(1, 2, 3, 1, 1)[:4] == (0, 0, 1, 1)


def test_order_depends_on_seed_and_epoch_and_resumes_exactly(fake):
    _, source = fake

    def run(**kw):
        return collect(source.dataset("train", 4, **kw))

    first = run(seed=1, epoch=0)
    again = run(seed=1, epoch=0)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["index"], run(seed=1, epoch=1)["index"])
    assert not np.array_equal(first["index"], run(seed=2, epoch=0)["index"])
    assert sorted(first["index"]) == list(range(3 * NUM_VAL))
    resumed = run(seed=1, epoch=0, start_step=3)
    for key in first:
        np.testing.assert_array_equal(resumed[key], first[key][12:])
    shards = [run(seed=1, epoch=0, process_index=p, process_count=3)["index"] for p in range(3)]
    assert sorted(np.concatenate(shards)) == list(range(3 * NUM_VAL))
    assert [len(s) for s in shards] == [10, 10, 10]
    with pytest.raises(ValueError, match="start_step"):
        source.dataset("train", 4, start_step=9)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        source.dataset("test", 4)


def test_pipeline_on_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = tfds.builder("imagenet2012", file_format="array_record")
        source = imagenet.ImageNetSource(builder, image_size=S)
        for split in ("train", "validation"):
            batches = list(source.dataset(split, 4))
            assert [len(b["label"]) for b in batches] == [4, 2]
            for b in batches:
                assert set(b) == {"image", "label", "index"}
                assert b["image"].shape == (len(b["label"]), S, S, 3)
                assert b["image"].dtype == np.float32 and np.isfinite(b["image"]).all()
                # normalised [0, 1] pixels lie in [-mean / std, (1 - mean) / std]
                assert (b["image"] >= (-MEAN / STD).min() - 1e-5).all()
                assert (b["image"] <= ((1 - MEAN) / STD).max() + 1e-5).all()
                assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64
                assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
            assert sorted(np.concatenate([b["index"] for b in batches])) == list(range(6))


def _one_line_naming(text: str, path: Path):
    assert str(path) in text and "\n" not in text, text


def test_missing_or_bad_archives_are_one_line(tmp_path):
    folder = tmp_path / "imagenet"
    with pytest.raises(DataError, match="ImageNet data folder does not exist"):
        imagenet.check_folder(folder)
    folder.mkdir()
    (folder / "train").mkdir()
    with pytest.raises(DataError) as e:
        imagenet.check_folder(folder)
    _one_line_naming(str(e.value), folder / "ILSVRC2012_img_train.tar")
    assert "missing ImageNet archive" in str(e.value) and "extracted train/" in str(e.value)
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w"):
        pass
    with pytest.raises(DataError, match="missing ImageNet archive") as e:
        imagenet.check_folder(folder)
    _one_line_naming(str(e.value), folder / "ILSVRC2012_img_val.tar")
    (folder / "ILSVRC2012_img_val.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="not a tar archive") as e:
        imagenet.check_folder(folder)
    _one_line_naming(str(e.value), folder / "ILSVRC2012_img_val.tar")
    # through the entry point: the run stops in one line naming the archive
    (folder / "ILSVRC2012_img_val.tar").unlink()
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--data_dir", str(folder), "--workdir", str(tmp_path / "run")])
    text = str(exit_info.value.code)
    assert text.startswith("experiments.imagenet: ") and "ILSVRC2012_img_val" in text
    _one_line_naming(text, folder / "ILSVRC2012_img_val.tar")
    with pytest.raises(SystemExit, match="--classifier_hidden must be >= 0, got -1"):
        entry.main(["--classifier_hidden", "-1", "--dry_run"])


def test_synthetic_run_end_to_end(fake, tmp_path, capsys):
    workdir = tmp_path / "run"
    summary = entry.main(
        [
            "--synthetic",
            "--synthetic_size",
            f"{HEIGHT}x{WIDTH}",
            "--synthetic_counts",
            f"{NUM_TRAIN},{NUM_VAL}",
            "--backbone",
            "resnet18",
            "--base_width",
            "4",
            "--stage_sizes",
            "1,1,1,1",
            "--num_dummy",
            "2",
            "--batch_size",
            "8",
            "--steps",
            "2",
            "--no_progress",
            "--workdir",
            str(workdir),
        ]
    )
    out = capsys.readouterr().out
    metrics = summary["metrics"]
    assert summary["steps"] == 2
    assert 0 <= metrics["label/acc"] <= metrics["label/top5"] <= 1
    assert summary["config"]["model"]["classifier_hidden"] == 0
    assert "35x35 crops" in out  # 7/8 of the fake images' shorter side (40)
    table = (workdir / "results.md").read_text()
    assert "| label/acc | label/top5 | Δm |" in table
    assert "| paper: Vanilla + Ours (K=2) | 0.7650 | - | - |" in table  # Table 4(a), 2 sets
    rows = [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["dgr/penalty"] > 0 for r in rows)


def test_dry_run_counts_resnet50_and_its_linear_classifier(capsys):
    entry.main(["--dry_run"])
    out = capsys.readouterr().out.strip().splitlines()
    head = 2048 * 1000 + 1000  # torchvision's fc
    assert json.loads(out[-1]) == {
        "encoder_params": 23_508_032,
        "head_params": head,
        "dummy_params": 3 * head,
        "total_params": 23_508_032 + 4 * head,
    }
    assert any(line.split()[:3] == ["head", "label", "2,049,000"] for line in out)


@pytest.mark.parametrize(
    "weight, num_dummy, paper_row",
    [
        (0.0, 3, "| paper: Vanilla | 0.7613 | - | - |"),  # DGR off: the vanilla network
        (0.1, 1, "| paper: Vanilla + Ours (K=1) | 0.7630 | - | - |"),
        (0.1, 3, "| paper: Vanilla + Ours (K=3) | 0.7598 | - | - |"),
        (0.1, 4, None),  # the paper has no column for 4 dummy sets
    ],
)
def test_results_table_puts_the_papers_top1_for_the_runs_dummy_sets_beside_it(
    weight, num_dummy, paper_row
):
    from dgr_jax.models import ModelConfig
    from dgr_jax.objective import DGRConfig
    from experiments.config import RunConfig
    from experiments.reporting import format_metrics, results_table

    config = RunConfig(
        dataset="imagenet",
        model=ModelConfig(network="classifier", classifier_hidden=0),
        dgr=DGRConfig(weight=weight, num_dummy=num_dummy),
    )
    tasks = config.task_records()
    values = {"label/acc": 0.5, "label/top5": 0.75, "delta_m": 0.5 / 0.7613 - 1}
    paper = {"label/acc": 0.5, "delta_m": 0.5 / 0.7613 - 1}
    table = results_table(config, tasks, values, paper).splitlines()
    method = "Vanilla + Ours" if weight else "Vanilla"
    assert table[0] == "| run | label/acc | label/top5 | Δm |"
    assert table[3] == f"| this run: {method} (whole-set) | 0.5000 | 0.7500 | -34.32% |"
    assert (table[4] if table[4] else None) == paper_row
    line = format_metrics(values, paper, tasks)
    assert line.startswith("label/acc 0.5000, label/top5 0.7500, Δm -34.32%")
