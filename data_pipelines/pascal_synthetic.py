"""Built-in data in the PASCAL-MT layout (``data_pipelines.pascal``): procedural images
with people and objects, written as the real files are (JPEG images, PNG labels,
saliency and normals, PASCAL-Part and Pascal-Context ``.mat`` files, the split lists), so
``--synthetic`` and the tests read them through the same checks and TFDS builder.

Each image (its size drawn between 3/4 of and the full ``height x width``) has a
background of two Context classes (a wall-like one whose normals are kept, a sky-like one
whose normals are not), one to three VOC objects (boxes and ellipses) and, in about half
of the images, a person drawn as the 24 PASCAL-Part parts' simple shapes. Colours follow
the class and the shading the surface normal, plus noise, so every task can be learnt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines import common

# VOC class -> Pascal-Context class (the 21 VOC classes' ids among Context's 459).
VOC_TO_CONTEXT = (
    0,
    2,
    23,
    25,
    31,
    34,
    45,
    59,
    65,
    72,
    98,
    397,
    113,
    207,
    258,
    284,
    308,
    347,
    368,
    416,
    427,
)
WALL, SKY = 3, 1  # Context ids: normals kept on the wall (NYUv2 has walls), not on the sky
VERSION = 1


def _box(height, width, top, left, bottom, right):
    mask = np.zeros((height, width), bool)
    mask[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] = True
    return mask


def _ellipse(height, width, cy, cx, ry, rx):
    y, x = np.mgrid[:height, :width]
    return ((y - cy) / max(ry, 1)) ** 2 + ((x - cx) / max(rx, 1)) ** 2 <= 1.0


def _person_parts(height, width, top, left, size):
    """PASCAL-Part names -> masks of a stick person of height ``size`` at (top, left)."""
    u = max(size // 8, 1)
    cx = left + 2 * u
    parts = {
        "head": _ellipse(height, width, top + u, cx, u, u),
        "neck": _box(
            height, width, top + 2 * u, cx - u // 2, top + 2 * u + max(u // 2, 1), cx + u // 2 + 1
        ),
        "torso": _box(height, width, top + 2 * u + max(u // 2, 1), cx - u, top + 5 * u, cx + u + 1),
        "luarm": _box(height, width, top + 2 * u + 1, cx - 2 * u, top + 4 * u, cx - u),
        "ruarm": _box(height, width, top + 2 * u + 1, cx + u + 1, top + 4 * u, cx + 2 * u + 1),
        "llarm": _box(height, width, top + 4 * u, cx - 2 * u, top + 5 * u, cx - u),
        "rlarm": _box(height, width, top + 4 * u, cx + u + 1, top + 5 * u, cx + 2 * u + 1),
        "luleg": _box(height, width, top + 5 * u, cx - u, top + 6 * u + u // 2, cx),
        "ruleg": _box(height, width, top + 5 * u, cx + 1, top + 6 * u + u // 2, cx + u + 1),
        "llleg": _box(height, width, top + 6 * u + u // 2, cx - u, top + 8 * u, cx),
        "rlleg": _box(height, width, top + 6 * u + u // 2, cx + 1, top + 8 * u, cx + u + 1),
    }
    taken = np.zeros((height, width), bool)
    for name, mask in parts.items():  # parts do not overlap, as in the annotation
        parts[name] = mask & ~taken
        taken |= mask
    return {name: mask for name, mask in parts.items() if mask.any()}


def _normal_png(normal):
    return np.round((np.asarray(normal) + 1.0) / 2.0 * 255.0).astype(np.uint8)


def write_example(root: Path, image_id: str, height: int, width: int, rng) -> None:
    from PIL import Image
    from scipy import io as scipy_io

    context = np.full((height, width), SKY, np.int32)
    horizon = int(rng.integers(height // 3, 2 * height // 3))
    context[horizon:] = WALL
    normal = np.zeros((height, width, 3))
    normal[:horizon] = (0.0, 0.0, 1.0)
    normal[horizon:] = (0.0, -0.8, 0.6)
    seg = np.zeros((height, width), np.uint8)
    salient = np.zeros((height, width), bool)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        voc = int(rng.integers(1, 21))
        if voc == 15:
            voc = 9  # people are drawn with their parts below
        size_y, size_x = (
            int(rng.integers(height // 6, height // 2)),
            int(rng.integers(width // 6, width // 2)),
        )
        top, left = int(rng.integers(0, height - size_y)), int(rng.integers(0, width - size_x))
        if rng.uniform() < 0.5:
            mask = _box(height, width, top, left, top + size_y, left + size_x)
        else:
            mask = _ellipse(
                height, width, top + size_y / 2, left + size_x / 2, size_y / 2, size_x / 2
            )
        context[mask], seg[mask], salient[mask] = VOC_TO_CONTEXT[voc], voc, True
        tilt = rng.normal(size=2) * 0.4
        normal[mask] = np.array([tilt[0], tilt[1], 1.0]) / np.linalg.norm([tilt[0], tilt[1], 1.0])
        objects.append((voc, mask, {}))
    if rng.uniform() < 0.5:
        size = int(rng.integers(height // 2, height))
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, max(width - size // 2, 1)))
        parts = _person_parts(height, width, top, left, size)
        mask = np.any(list(parts.values()), axis=0)
        context[mask], seg[mask], salient[mask] = VOC_TO_CONTEXT[15], 15, True
        normal[mask] = (0.0, 0.0, 1.0)
        objects.append((15, mask, parts))
    seg[rng.uniform(size=seg.shape) < 0.01] = 255  # VOC's unlabelled pixels
    palette = np.random.default_rng(7).uniform(40, 215, size=(460, 3))
    shading = 0.75 + 0.25 * normal[..., 2:3]
    image = palette[context] * shading + rng.normal(0, 8, size=(height, width, 3))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        root / "JPEGImages" / f"{image_id}.jpg", quality=92
    )
    Image.fromarray(seg).save(root / "semseg" / "pascal-context" / f"{image_id}.png")
    Image.fromarray((salient * 255).astype(np.uint8)).save(root / "sal_distill" / f"{image_id}.png")
    Image.fromarray(_normal_png(normal)).save(root / "normals_distill" / f"{image_id}.png")
    scipy_io.savemat(
        root / "pascal-context" / "trainval" / f"{image_id}.mat",
        {"LabelMap": context.astype(np.uint16)},
    )
    records = np.empty(
        (1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    for i, (voc, mask, parts) in enumerate(objects):
        if parts:
            part_records = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (name, part) in enumerate(parts.items()):
                part_records[0, j] = (name, part.astype(np.uint8))
        else:
            part_records = np.zeros((0, 0))
        records[0, i] = (
            "person" if voc == 15 else f"voc{voc}",
            np.uint8(voc),
            mask.astype(np.uint8),
            part_records,
        )
    scipy_io.savemat(
        root / "human_parts" / f"{image_id}.mat", {"anno": {"imname": image_id, "objects": records}}
    )


def write_synthetic(
    root: str | Path, num_train: int, num_val: int, height: int, width: int, seed: int = 0
) -> Path:
    """Write ``num_train`` + ``num_val`` images of at most ``height x width`` into ``root``."""
    root = Path(root)
    for folder in (
        "ImageSets/Context",
        "JPEGImages",
        "semseg/pascal-context",
        "human_parts",
        "sal_distill",
        "normals_distill",
        "pascal-context/trainval",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count, offset in (("train", num_train, 0), ("val", num_val, num_train)):
        ids = [f"2008_{offset + i:06d}" for i in range(count)]
        for image_id in ids:
            h = int(rng.integers(max(3 * height // 4, 8), height + 1))
            w = int(rng.integers(max(3 * width // 4, 8), width + 1))
            write_example(root, image_id, h, w, rng)
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def synthetic_root(num_train: int, num_val: int, height: int, width: int, seed: int = 0) -> Path:
    """The built-in set of these sizes, written once under ``common.cache_root()``."""
    root = (
        common.cache_root()
        / "synthetic"
        / f"pascal_v{VERSION}_{num_train}_{num_val}_{height}x{width}_s{seed}"
    )
    return common.write_once(
        root, lambda folder: write_synthetic(folder, num_train, num_val, height, width, seed)
    )
