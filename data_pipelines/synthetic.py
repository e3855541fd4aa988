"""Procedural NYUv2- and Cityscapes-format scenes, ray-cast in numpy, for tests and demos.

Writes the community ``.npy`` folders that ``data_pipelines.scenes`` reads (the mtan /
auto-lambda preprocessing), with ``{i}`` running 0..n-1 in every folder::

    nyuv2       root/{train,val}/image/{i}.npy     float32 (H, W, 3) in [0, 1]
                root/{train,val}/label/{i}.npy     float32 (H, W) integers 0..12, -1 ignore
                root/{train,val}/depth/{i}.npy     float32 (H, W, 1) metres (z-depth), 0 invalid
                root/{train,val}/normal/{i}.npy    float32 (H, W, 3) unit camera-frame normals, all-zero invalid
    cityscapes  root/{train,val}/image/{i}.npy     float32 (H, W, 3) in [0, 1]
                root/{train,val}/label_19/{i}.npy  float32 (H, W) integers 0..18, -1 ignore
                root/{train,val}/part_seg/{i}.npy  float32 (H, W) integers 0..9, -1 no part
                root/{train,val}/depth/{i}.npy     float32 (H, W, 1) disparity, -1 invalid (sky)

Scenes are made of planes, (yaw-rotated) boxes and spheres; every pixel's ray is
intersected with all of them (vectorised over pixels) and the nearest hit wins, so
depth and normals are exact for the geometry, not estimated from the image.

Conventions
-----------
* Camera frame: x right, y down, z forward (the optical axis). A pixel ``(row, col)``
  looks along ``((col + 0.5 - W/2) / f, (row + 0.5 - H/2) / f, 1)``.
* ``depth`` is the z coordinate of the hit point in the camera frame (not the distance
  along the ray).
* ``normal`` is the unit surface normal in the camera frame, oriented towards the
  camera (``normal . ray < 0``): a wall seen straight on has normal ``(0, 0, -1)``,
  the floor seen from above has ``y < 0`` (up is -y).
* Disparity (Cityscapes ``depth``) is ``DISPARITY_SCALE / z`` with ``DISPARITY_SCALE =
  baseline * focal`` of the Cityscapes stereo rig (0.209 m, 2262 px at 2048 px width)
  taken at the 256-pixel width of the auto-lambda preprocessing: about 59.2 / z, i.e.
  a few tens for close objects, whatever resolution is rendered.
* Indoor focal length: 60 degrees horizontal field of view. Street focal length: the
  Cityscapes cameras' (2262 px at 2048 px width, about 49 degrees).
* Invalid pixels like real sensors: NYUv2 windows (glass) and a few random holes have
  depth 0 and normal 0 (exactly the same pixels); some pixels on object boundaries are
  labelled -1 (and have part -1 in Cityscapes). Cityscapes disparity is -1 exactly on
  the sky.

Determinism: scene ``i`` of a split is drawn from its own generator
``scene_rng(seed, split, i)``; the same (seed, split, index, size) gives bit-identical
arrays, and the geometry does not depend on the size (only pixel noise does).

Command line::

    python -m data_pipelines.synthetic --kind nyuv2 --out DIR --num_train 64 --num_val 16
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from data_pipelines import common
from data_pipelines.common import DataError

GENERATOR_VERSION = 1

KINDS = ("nyuv2", "cityscapes")
FIELDS = {
    "nyuv2": ("image", "label", "depth", "normal"),
    "cityscapes": ("image", "label_19", "part_seg", "depth"),
}
DEFAULT_SIZE = {"nyuv2": (96, 128), "cityscapes": (64, 128)}
SPLITS = ("train", "val")

NYUV2_CLASSES = (
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "painting",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
)
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
CITYSCAPES_PARTS = (
    "torso",
    "head",
    "arms",
    "legs",
    "window",
    "wheel",
    "light",
    "license plate",
    "chassis",
    "other",
)

INDOOR_HFOV_DEG = 60.0
STREET_FOCAL_PER_WIDTH = 2262.05 / 2048.0
DISPARITY_SCALE = 0.209313 * 2262.05 * 256.0 / 2048.0  # baseline * focal at 256 px width
STREET_MAX_DISTANCE = 600.0  # metres; anything farther is sky

_EPS = 1e-9
_SPLIT_CODE = {"train": 0, "val": 1}

# NYUv2 ids
BED, BOOKS, CEILING, CHAIR, FLOOR, FURNITURE, OBJECTS, PAINTING, SOFA, TABLE, TV, WALL, WINDOW = (
    range(13)
)
# Cityscapes train ids
(
    ROAD,
    SIDEWALK,
    BUILDING,
    CS_WALL,
    FENCE,
    POLE,
    TRAFFIC_LIGHT,
    TRAFFIC_SIGN,
    VEGETATION,
    TERRAIN,
    SKY,
    PERSON,
    RIDER,
    CAR,
    TRUCK,
    BUS,
    TRAIN,
    MOTORCYCLE,
    BICYCLE,
) = range(19)
# Cityscapes parts
TORSO, HEAD, ARMS, LEGS, P_WINDOW, WHEEL, LIGHT, PLATE, CHASSIS, OTHER = range(10)


# --------------------------------------------------------------------------- geometry


def _vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(3)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(eq=False)
class Plane:
    """The infinite plane through ``point`` with unit ``normal`` (world frame)."""

    point: Sequence[float]
    normal: Sequence[float]
    label: int = 0
    part: int = -1
    tag: str = ""
    color: Sequence[float] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.point = _vec(self.point)
        n = _vec(self.normal)
        self.normal = n / np.linalg.norm(n)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((self.point - origins) @ self.normal) / (dirs @ self.normal)
        return np.where(np.isfinite(t) & (t > _EPS), t, np.inf)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.normal, points.shape).copy()


@dataclass(eq=False)
class Box:
    """A box with centre ``center``, half-sizes ``half`` along its own axes, rotated by
    ``yaw`` (radians) about the world z axis: local x points to (cos yaw, sin yaw, 0)."""

    center: Sequence[float]
    half: Sequence[float]
    yaw: float = 0.0
    label: int = 0
    part: int = -1
    tag: str = ""
    color: Sequence[float] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.center = _vec(self.center)
        self.half = _vec(self.half)
        self.rotation = _rot_z(float(self.yaw))  # local -> world

    def to_local(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) @ self.rotation

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = self.to_local(origins)
        d = dirs @ self.rotation
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-self.half - o) * inv
            t2 = (self.half - o) * inv
            t_near = np.minimum(t1, t2).max(axis=-1)
            t_far = np.maximum(t1, t2).min(axis=-1)
            t = np.where(t_near > _EPS, t_near, t_far)
            ok = (t_far >= t_near) & (t > _EPS)
        return np.where(ok, t, np.inf)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        local = self.to_local(points)
        axis = np.argmax(np.abs(local) / self.half, axis=-1)
        n = np.zeros_like(local)
        rows = np.arange(len(local))
        n[rows, axis] = np.sign(local[rows, axis])
        return n @ self.rotation.T


@dataclass(eq=False)
class Sphere:
    center: Sequence[float]
    radius: float
    label: int = 0
    part: int = -1
    tag: str = ""
    color: Sequence[float] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.center = _vec(self.center)
        self.radius = float(self.radius)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origins - self.center
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = (oc * dirs).sum(-1)
        c = (oc * oc).sum(-1) - self.radius**2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t0 = (-b - root) / a
        t1 = (-b + root) / a
        t = np.where(t0 > _EPS, t0, t1)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def normal_at(self, points: np.ndarray) -> np.ndarray:
        return (points - self.center) / self.radius


Primitive = Plane | Box | Sphere


class Hits(NamedTuple):
    t: np.ndarray  # (N,) ray parameter of the nearest hit (units of the direction), inf if none
    index: np.ndarray  # (N,) index of the primitive hit, -1 if none
    point: np.ndarray  # (N, 3) hit point (origin + t * dir), 0 if none
    normal: np.ndarray  # (N, 3) unit normal facing the ray (normal . dir <= 0), 0 if none


def _raycast(
    origins,
    dirs,
    primitives: Sequence[Primitive],
    t_max: float = np.inf,
    candidates: Sequence[np.ndarray | None] | None = None,
) -> Hits:
    """Nearest hit of each ray ``origins + t * dirs`` (t > 0, t < t_max) among
    ``primitives``. ``origins``: (3,) or (N, 3); ``dirs``: (N, 3), any length.
    ``candidates[k]``: the indices of the only rays that can hit primitive k (None: all)."""
    dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
    origins = np.asarray(origins, dtype=np.float64)
    origins = origins.reshape(1, 3) if origins.size == 3 else origins.reshape(-1, 3)
    n = len(dirs)
    best_t = np.full(n, np.inf)
    best_i = np.full(n, -1, dtype=np.int64)
    for k, prim in enumerate(primitives):
        rays = None if candidates is None else candidates[k]
        if rays is None:
            t = prim.intersect(origins, dirs)
            closer = t < best_t
            best_t = np.where(closer, t, best_t)
            best_i[closer] = k
        elif len(rays):
            t = prim.intersect(origins if len(origins) == 1 else origins[rays], dirs[rays])
            closer = t < best_t[rays]
            best_t[rays[closer]] = t[closer]
            best_i[rays[closer]] = k
    miss = ~(best_t < t_max)
    best_t[miss] = np.inf
    best_i[miss] = -1
    hit = ~miss
    points = np.zeros((n, 3))
    points[hit] = (origins + np.where(hit, best_t, 0.0)[:, None] * dirs)[hit]
    normals = np.zeros((n, 3))
    for k in np.unique(best_i[hit]):
        sel = best_i == k
        normals[sel] = primitives[k].normal_at(points[sel])
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-300)
    facing = (normals * dirs).sum(-1) > 0
    normals[facing] *= -1.0
    return Hits(best_t, best_i, points, normals)


def _camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera -> world rotation (columns: camera x right, y down, z forward in a z-up
    world). yaw about world z from +x, pitch > 0 looks up, roll about the optical axis."""
    cp, sp = math.cos(pitch), math.sin(pitch)
    forward = np.array([cp * math.cos(yaw), cp * math.sin(yaw), sp])
    right0 = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down0 = np.cross(forward, right0)
    cr, sr = math.cos(roll), math.sin(roll)
    right = cr * right0 + sr * down0
    down = -sr * right0 + cr * down0
    return np.stack([right, down, forward], axis=1)


def _pixel_rays(height: int, width: int, focal: float) -> np.ndarray:
    """(H*W, 3) camera-frame directions with z = 1, row-major over pixels."""
    u = (np.arange(width) + 0.5 - width / 2.0) / focal
    v = (np.arange(height) + 0.5 - height / 2.0) / focal
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu.ravel(), vv.ravel(), np.ones(height * width)], axis=-1)


def _corners(prim: Primitive, camera_rotation: np.ndarray) -> np.ndarray | None:
    """Corners of a box bounding the primitive (world frame); None for planes."""
    signs = np.array(
        [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64
    )
    if isinstance(prim, Box):
        return prim.center + (signs * prim.half) @ prim.rotation.T
    if isinstance(prim, Sphere):
        return prim.center + (signs * prim.radius) @ camera_rotation.T
    return None


@dataclass
class Camera:
    position: np.ndarray
    rotation: np.ndarray  # camera -> world
    focal: float

    def rays(self, height: int, width: int) -> np.ndarray:
        """World-frame ray directions whose camera-frame z is 1, so the ray parameter t
        of a hit is its depth."""
        return _pixel_rays(height, width, self.focal) @ self.rotation.T

    def candidates(
        self, primitives: Sequence[Primitive], height: int, width: int
    ) -> list[np.ndarray | None]:
        """For ``_raycast``: per primitive, the pixels inside the screen rectangle that
        bounds the projection of its bounding box (exact culling: a convex body in front
        of the camera projects inside the hull of its bounding corners' projections);
        None (every pixel) where the body reaches behind the camera."""
        out: list[np.ndarray | None] = []
        for prim in primitives:
            corners = _corners(prim, self.rotation)
            if corners is None:
                out.append(None)
                continue
            cam = (corners - self.position) @ self.rotation
            z = cam[:, 2]
            if np.all(z <= 0):
                out.append(np.zeros(0, dtype=np.int64))
                continue
            if np.any(z < 1e-3):
                out.append(None)
                continue
            col = self.focal * cam[:, 0] / z + width / 2.0 - 0.5  # pixel-centre coordinates
            row = self.focal * cam[:, 1] / z + height / 2.0 - 0.5
            c0, c1 = (
                max(int(np.floor(col.min())) - 1, 0),
                min(int(np.ceil(col.max())) + 1, width - 1),
            )
            r0, r1 = (
                max(int(np.floor(row.min())) - 1, 0),
                min(int(np.ceil(row.max())) + 1, height - 1),
            )
            if c0 > c1 or r0 > r1:
                out.append(np.zeros(0, dtype=np.int64))
                continue
            out.append(
                (np.arange(r0, r1 + 1)[:, None] * width + np.arange(c0, c1 + 1)[None, :]).ravel()
            )
        return out


# --------------------------------------------------------------------------- textures


def _hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic value in [0, 1) per integer lattice point (splitmix64 finaliser)."""
    h = (
        ix.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        ^ iy.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        ^ iz.astype(np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    )
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_STRIPE_AXIS = np.array([0.62, 0.48, 0.62]) / np.linalg.norm([0.62, 0.48, 0.62])


def _texture(points: np.ndarray, kind: str, freq: float, salt: int) -> np.ndarray:
    """Pattern in [0, 1] attached to world-space points; ``freq`` in cycles per metre."""
    if kind == "flat":
        return np.full(len(points), 0.5)
    q = points * freq + 0.25  # keeps axis-aligned planes at integer coordinates off cell edges
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (q @ _STRIPE_AXIS))
    if kind == "checker":
        return np.floor(q).sum(-1) % 2.0
    if kind == "noise":
        f = np.floor(q)
        coarse = _hash01(f[:, 0], f[:, 1], f[:, 2], salt)
        g = np.floor(q * 3.0)
        fine = _hash01(g[:, 0], g[:, 1], g[:, 2], salt + 1)
        return 0.65 * coarse + 0.35 * fine
    if kind == "grain":
        f = np.floor(q * 4.0)
        return np.clip(
            0.5
            + 0.4 * np.sin(2 * np.pi * (q @ _STRIPE_AXIS))
            + 0.3 * (_hash01(f[:, 0], f[:, 1], f[:, 2], salt) - 0.5),
            0.0,
            1.0,
        )
    raise ValueError(f"unknown texture {kind!r}")


# (base colour, texture, frequency cycles/m, amplitude)
_INDOOR_MATERIALS = {
    BED: ((0.78, 0.36, 0.36), "stripes", 5.0, 0.35),
    BOOKS: ((0.20, 0.40, 0.85), "stripes", 28.0, 0.6),
    CEILING: ((0.93, 0.93, 0.90), "noise", 2.0, 0.05),
    CHAIR: ((0.55, 0.33, 0.18), "noise", 14.0, 0.3),
    FLOOR: ((0.62, 0.46, 0.30), "checker", 2.0, 0.25),
    FURNITURE: ((0.46, 0.30, 0.18), "grain", 9.0, 0.35),
    OBJECTS: ((0.30, 0.72, 0.40), "noise", 9.0, 0.4),
    PAINTING: ((0.80, 0.55, 0.25), "noise", 7.0, 0.8),
    SOFA: ((0.30, 0.32, 0.62), "noise", 22.0, 0.2),
    TABLE: ((0.68, 0.52, 0.34), "stripes", 16.0, 0.3),
    TV: ((0.06, 0.06, 0.09), "flat", 1.0, 0.0),
    WALL: ((0.82, 0.79, 0.70), "noise", 3.0, 0.08),
    WINDOW: ((0.72, 0.86, 1.00), "noise", 1.5, 0.25),
}

_STREET_MATERIALS = {
    ROAD: ((0.36, 0.36, 0.38), "noise", 6.0, 0.12),
    SIDEWALK: ((0.62, 0.60, 0.56), "checker", 2.5, 0.15),
    BUILDING: ((0.72, 0.62, 0.50), "checker", 0.7, 0.3),
    CS_WALL: ((0.62, 0.62, 0.60), "noise", 4.0, 0.15),
    FENCE: ((0.52, 0.45, 0.34), "stripes", 6.0, 0.5),
    POLE: ((0.42, 0.42, 0.45), "flat", 1.0, 0.0),
    TRAFFIC_LIGHT: ((0.16, 0.16, 0.10), "stripes", 4.0, 0.4),
    TRAFFIC_SIGN: ((0.92, 0.80, 0.12), "flat", 1.0, 0.0),
    VEGETATION: ((0.22, 0.50, 0.16), "noise", 8.0, 0.5),
    TERRAIN: ((0.46, 0.52, 0.26), "noise", 5.0, 0.3),
    PERSON: ((0.50, 0.40, 0.40), "noise", 20.0, 0.15),
    RIDER: ((0.50, 0.40, 0.40), "noise", 20.0, 0.15),
    CAR: ((0.60, 0.10, 0.10), "flat", 1.0, 0.0),
    TRUCK: ((0.80, 0.80, 0.80), "flat", 1.0, 0.0),
    BUS: ((0.90, 0.70, 0.10), "flat", 1.0, 0.0),
    TRAIN: ((0.70, 0.70, 0.75), "flat", 1.0, 0.0),
    MOTORCYCLE: ((0.15, 0.15, 0.18), "flat", 1.0, 0.0),
    BICYCLE: ((0.20, 0.35, 0.55), "flat", 1.0, 0.0),
}


def _albedo(points, index, labels, prims, materials, jitter, salt) -> np.ndarray:
    """Per-pixel albedo: the primitive's colour (or its class's, jittered per scene)
    modulated by the class's texture."""
    n = len(points)
    albedo = np.zeros((n, 3))
    colors = np.array(
        [
            materials.get(p.label, ((0.5, 0.5, 0.5),))[0] if p.color is None else p.color
            for p in prims
        ]
        + [(0.0, 0.0, 0.0)],
        dtype=np.float64,
    )
    base = colors[index]  # index -1 -> the last row (unused)
    for lab in np.unique(labels):
        if lab < 0 or lab not in materials:
            continue
        sel = labels == lab
        color, kind, freq, amp = materials[lab]
        own = np.array([p.color is None for p in prims] + [True])[index[sel]]
        b = np.where(own[:, None], np.asarray(color) * jitter[lab], base[sel])
        tex = _texture(points[sel], kind, freq, salt + 7919 * int(lab))
        albedo[sel] = b * (1.0 + amp * (2.0 * tex - 1.0))[:, None]
    return np.clip(albedo, 0.0, 1.0)


def _boundary(keys: np.ndarray) -> np.ndarray:
    """Pixels whose key differs from the right or lower neighbour's (or is differed from)."""
    edge = np.zeros(keys.shape, dtype=bool)
    dx = keys[:, 1:] != keys[:, :-1]
    dy = keys[1:, :] != keys[:-1, :]
    edge[:, 1:] |= dx
    edge[1:, :] |= dy
    return edge


def _finish_image(
    radiance: np.ndarray, pix: np.random.Generator, height: int, width: int
) -> np.ndarray:
    noisy = radiance.reshape(height, width, 3) + pix.normal(0.0, 0.01, (height, width, 3))
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _check_size(height: int, width: int) -> None:
    if int(height) != height or int(width) != width or height < 2 or width < 2:
        raise ValueError(f"height and width must be integers >= 2, got {height}x{width}")


# --------------------------------------------------------------------------- indoor


@dataclass
class _Decal:
    wall: int  # index of the wall primitive
    lo: tuple[float, float]  # (u, v) lower corner in the wall's frame
    hi: tuple[float, float]
    label: int
    color: tuple[float, float, float]


def _indoor_geometry(rng: np.random.Generator) -> dict:
    room = np.array([rng.uniform(3.0, 6.0), rng.uniform(3.5, 7.0), rng.uniform(2.4, 3.2)])
    rx, ry, rz = room
    prims: list[Primitive] = [
        Plane((0, 0, 0), (0, 0, 1), FLOOR),
        Plane((0, 0, rz), (0, 0, -1), CEILING),
        # walls: meta gives the in-plane frame (origin, u axis, v axis = +z) and u length
        Plane((0, 0, 0), (1, 0, 0), WALL, tag="wall", meta={"u": (0, 1, 0), "length": ry}),
        Plane((rx, 0, 0), (-1, 0, 0), WALL, tag="wall", meta={"u": (0, 1, 0), "length": ry}),
        Plane((0, 0, 0), (0, 1, 0), WALL, tag="wall", meta={"u": (1, 0, 0), "length": rx}),
        Plane((0, ry, 0), (0, -1, 0), WALL, tag="wall", meta={"u": (1, 0, 0), "length": rx}),
    ]
    # mostly near a wall, looking into the room, like a person taking a photo
    cam_pos = np.array(
        [
            rng.uniform(0.4, rx - 0.4),
            rng.uniform(0.4, ry - 0.4),
            rng.uniform(1.0, min(1.7, rz - 0.4)),
        ]
    )
    if rng.random() < 0.7:
        side = rng.integers(4)
        near = rng.uniform(0.4, 1.2)
        cam_pos[side // 2] = near if side % 2 == 0 else room[side // 2] - near
    to_centre = room[:2] / 2 - cam_pos[:2]
    yaw = math.atan2(to_centre[1], to_centre[0]) + rng.uniform(-0.9, 0.9)
    camera = Camera(
        cam_pos,
        _camera_rotation(yaw, math.radians(rng.uniform(-28, 3)), math.radians(rng.uniform(-3, 3))),
        1.0,
    )
    footprints: list[tuple[float, float, float]] = []  # (x, y, radius) of placed floor objects
    supports: list[
        tuple[np.ndarray, float, float, float, float]
    ] = []  # (centre xy, yaw, hx, hy, top z)

    def place(hx: float, hy: float, against_wall: float = 0.5, tries: int = 25):
        for _ in range(tries):
            yaw = rng.integers(4) * np.pi / 2 + (
                rng.uniform(-0.4, 0.4) if rng.random() < 0.3 else 0.0
            )
            c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
            ex, ey = c * hx + s * hy, s * hx + c * hy  # axis-aligned half extents
            if 2 * ex > rx - 0.1 or 2 * ey > ry - 0.1:
                continue
            x, y = rng.uniform(ex + 0.05, rx - ex - 0.05), rng.uniform(ey + 0.05, ry - ey - 0.05)
            if rng.random() < against_wall:
                side = rng.integers(4)
                x = [ex + 0.02, rx - ex - 0.02, x, x][side]
                y = [y, y, ey + 0.02, ry - ey - 0.02][side]
            r = math.hypot(hx, hy)
            if math.hypot(x - cam_pos[0], y - cam_pos[1]) < r + 0.5:
                continue
            if any(math.hypot(x - fx, y - fy) < 0.8 * (r + fr) for fx, fy, fr in footprints):
                continue
            footprints.append((x, y, r))
            return np.array([x, y]), yaw
        return None, None

    def add_box(xy, yaw, offset, half, label, **kw):
        """A box whose centre is ``xy`` + ``offset`` rotated by ``yaw`` (offset z absolute)."""
        R = _rot_z(yaw)
        centre = np.array([xy[0], xy[1], 0.0]) + R @ np.array([offset[0], offset[1], 0.0])
        centre[2] = offset[2]
        prims.append(Box(centre, half, yaw, label, **kw))

    def legs(xy, yaw, hx, hy, height, label, thick=0.025):
        for sx in (-1, 1):
            for sy in (-1, 1):
                add_box(
                    xy,
                    yaw,
                    (sx * (hx - thick), sy * (hy - thick), height / 2),
                    (thick, thick, height / 2),
                    label,
                )

    if rng.random() < 0.5:  # bed: mattress + headboard
        hx, hy = 1.0 * rng.uniform(0.9, 1.1), 0.75 * rng.uniform(0.9, 1.2)
        xy, yaw = place(hx, hy, 0.8)
        if xy is not None:
            add_box(xy, yaw, (0, 0, 0.27), (hx, hy, 0.27), BED)
            add_box(xy, yaw, (-hx + 0.04, 0, 0.5), (0.04, hy, 0.5), BED)
    if rng.random() < 0.5:  # sofa: seat, back, arms
        hx, hy = rng.uniform(0.8, 1.1), rng.uniform(0.4, 0.5)
        xy, yaw = place(hx, hy, 0.7)
        if xy is not None:
            add_box(xy, yaw, (0, 0.05, 0.22), (hx, hy - 0.05, 0.22), SOFA)
            add_box(xy, yaw, (0, -hy + 0.09, 0.42), (hx, 0.09, 0.42), SOFA)
            for sx in (-1, 1):
                add_box(xy, yaw, (sx * (hx - 0.08), 0.05, 0.31), (0.08, hy - 0.05, 0.31), SOFA)
    for _ in range(rng.integers(1, 3)):  # tables: top + 4 legs
        hx, hy, top = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.7, 0.78)
        xy, yaw = place(hx, hy, 0.3)
        if xy is not None:
            add_box(xy, yaw, (0, 0, top - 0.02), (hx, hy, 0.02), TABLE)
            legs(xy, yaw, hx - 0.03, hy - 0.03, top - 0.04, TABLE)
            supports.append((xy, yaw, hx, hy, top))
    for _ in range(rng.integers(1, 6)):  # chairs: seat, 4 legs, back
        h = rng.uniform(0.2, 0.25)
        xy, yaw = place(h, h, 0.2)
        if xy is not None:
            add_box(xy, yaw, (0, 0, 0.45), (h, h, 0.025), CHAIR)
            legs(xy, yaw, h, h, 0.425, CHAIR, 0.02)
            add_box(xy, yaw, (-h + 0.02, 0, 0.7), (0.02, h, 0.23), CHAIR)
    for _ in range(rng.integers(2, 6)):  # furniture: cabinets, shelves, wardrobes
        hx, hy, height = (
            rng.uniform(0.3, 0.8),
            rng.uniform(0.2, 0.3),
            rng.uniform(0.5, min(2.1, rz - 0.2)),
        )
        xy, yaw = place(hx, hy, 0.85)
        if xy is not None:
            add_box(xy, yaw, (0, 0, height / 2), (hx, hy, height / 2), FURNITURE)
            supports.append((xy, yaw, hx, hy, height))

    def spot(margin: float):
        """A point on a support surface (or on the floor): (x, y, z of the surface)."""
        if supports and rng.random() < 0.75:
            xy, yaw, hx, hy, top = supports[rng.integers(len(supports))]
            local = np.array(
                [
                    rng.uniform(-1, 1) * max(hx - margin, 0.0),
                    rng.uniform(-1, 1) * max(hy - margin, 0.0),
                    0.0,
                ]
            )
            p = np.array([xy[0], xy[1], 0.0]) + _rot_z(yaw) @ local
            return p[0], p[1], top, False
        x, y = (
            rng.uniform(margin + 0.05, rx - margin - 0.05),
            rng.uniform(margin + 0.05, ry - margin - 0.05),
        )
        return x, y, 0.0, True

    def clear_of_camera(x, y, r, on_floor):
        if math.hypot(x - cam_pos[0], y - cam_pos[1]) < r + 0.5:
            return False
        if on_floor and any(math.hypot(x - fx, y - fy) < r + fr for fx, fy, fr in footprints):
            return False
        return True

    for _ in range(rng.integers(2, 11)):  # books: lying or standing small boxes
        if rng.random() < 0.5:
            half = (rng.uniform(0.08, 0.14), rng.uniform(0.10, 0.13), rng.uniform(0.012, 0.03))
        else:
            half = (rng.uniform(0.012, 0.03), rng.uniform(0.08, 0.12), rng.uniform(0.10, 0.14))
        x, y, z, on_floor = spot(0.15)
        if clear_of_camera(x, y, 0.2, on_floor):
            prims.append(
                Box(
                    (x, y, z + half[2]),
                    half,
                    rng.uniform(0, np.pi),
                    BOOKS,
                    color=tuple(rng.uniform(0.1, 0.9, 3)),
                )
            )
    for _ in range(rng.integers(2, 9)):  # objects: balls, vases, boxes
        x, y, z, on_floor = spot(0.2)
        if rng.random() < 0.7:
            r = rng.uniform(0.06, 0.12) if not on_floor else rng.uniform(0.1, 0.32)
            if clear_of_camera(x, y, r, on_floor):
                prims.append(
                    Sphere((x, y, z + r), r, OBJECTS, color=tuple(rng.uniform(0.15, 0.9, 3)))
                )
        else:
            half = rng.uniform(0.05, 0.15, 3)
            if clear_of_camera(x, y, float(np.hypot(half[0], half[1])), on_floor):
                prims.append(
                    Box(
                        (x, y, z + half[2]),
                        half,
                        rng.uniform(0, np.pi),
                        OBJECTS,
                        color=tuple(rng.uniform(0.15, 0.9, 3)),
                    )
                )

    decals: list[_Decal] = []
    used: dict[int, list[tuple[float, float]]] = {}

    def add_decal(label, width_range, height_range, bottom_range, color):
        for _ in range(10):
            wall = int(rng.integers(2, 6))
            length = prims[wall].meta["length"]
            w, h = rng.uniform(*width_range), rng.uniform(*height_range)
            bottom = rng.uniform(*bottom_range)
            if w > length - 0.4 or bottom + h > rz - 0.1:
                continue
            u0 = rng.uniform(0.2, length - 0.2 - w)
            if any(u0 < b + 0.1 and a < u0 + w + 0.1 for a, b in used.get(wall, [])):
                continue
            used.setdefault(wall, []).append((u0, u0 + w))
            decals.append(_Decal(wall, (u0, bottom), (u0 + w, bottom + h), label, color))
            return

    for _ in range(rng.integers(0, 3)):
        add_decal(WINDOW, (0.7, 1.8), (0.9, 1.4), (0.75, 1.0), _INDOOR_MATERIALS[WINDOW][0])
    for _ in range(rng.integers(0, 3)):
        add_decal(PAINTING, (0.35, 1.1), (0.3, 0.8), (1.1, 1.6), tuple(rng.uniform(0.1, 0.9, 3)))
    if rng.random() < 0.4:
        add_decal(TV, (0.8, 1.3), (0.45, 0.75), (0.9, 1.2), _INDOOR_MATERIALS[TV][0])

    lights = [
        np.array(
            [rng.uniform(0.3, rx - 0.3), rng.uniform(0.3, ry - 0.3), rz - rng.uniform(0.2, 0.6)]
        )
        for _ in range(rng.integers(1, 3))
    ]
    holes = [
        (rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.01, 0.035))
        for _ in range(rng.integers(0, 4))
    ]
    jitter = {lab: rng.uniform(0.85, 1.15, 3) for lab in range(13)}
    return {
        "prims": prims,
        "decals": decals,
        "camera": camera,
        "lights": lights,
        "holes": holes,
        "jitter": jitter,
        "ambient": rng.uniform(0.25, 0.35),
        "salt": int(rng.integers(1 << 31)),
    }


def _holes_mask(holes, height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    for cu, cv, r in holes:
        mask |= (cols + 0.5 - cu * width) ** 2 + (rows + 0.5 - cv * height) ** 2 < (r * width) ** 2
    return mask


def _render_indoor(rng: np.random.Generator, height: int, width: int):
    """``render_indoor_scene`` plus the internals (for tests): the scene dict, the hits
    and the per-pixel primitive index."""
    _check_size(height, width)
    geo, pix = rng.spawn(2)
    scene = _indoor_geometry(geo)
    camera: Camera = scene["camera"]
    camera.focal = (width / 2.0) / math.tan(math.radians(INDOOR_HFOV_DEG) / 2.0)
    prims = scene["prims"]
    dirs = camera.rays(height, width)
    hits = _raycast(
        camera.position, dirs, prims, candidates=camera.candidates(prims, height, width)
    )
    index, points = hits.index, hits.point
    labels = np.array([p.label for p in prims] + [-1])[index]
    decal_id = np.full(len(index), -1)
    for k, decal in enumerate(scene["decals"]):
        wall = prims[decal.wall]
        sel = np.flatnonzero(index == decal.wall)
        rel = points[sel] - wall.point
        u, v = rel @ _vec(wall.meta["u"]), rel[:, 2]
        inside = (u >= decal.lo[0]) & (u <= decal.hi[0]) & (v >= decal.lo[1]) & (v <= decal.hi[1])
        labels[sel[inside]] = decal.label
        decal_id[sel[inside]] = k

    albedo = _albedo(
        points, index, labels, prims, _INDOOR_MATERIALS, scene["jitter"], scene["salt"]
    )
    for k, decal in enumerate(scene["decals"]):  # decals have their own colour; TV frames
        sel = decal_id == k
        if decal.label == PAINTING:
            tex = _texture(points[sel], "noise", 7.0, scene["salt"] + 31 * k)
            albedo[sel] = np.clip(np.asarray(decal.color) * (0.4 + 1.2 * tex)[:, None], 0, 1)
    normal = hits.normal
    shade = np.full(len(index), scene["ambient"])
    for light in scene["lights"]:
        to_light = light - points
        dist = np.linalg.norm(to_light, axis=-1)
        cos = np.maximum((normal * to_light).sum(-1) / np.maximum(dist, 1e-9), 0.0)
        shade += 0.95 / len(scene["lights"]) * cos / (1.0 + (dist / 3.5) ** 2) * 1.6
    radiance = albedo * shade[:, None]
    glass = labels == WINDOW
    radiance[glass] = albedo[glass]  # daylight through the window, unshaded
    image = _finish_image(radiance, pix, height, width)

    depth = np.where(index >= 0, hits.t, 0.0).reshape(height, width)
    normal_cam = (normal @ camera.rotation).reshape(height, width, 3)
    invalid = (
        glass.reshape(height, width) | _holes_mask(scene["holes"], height, width) | (depth <= 0)
    )
    depth[invalid] = 0.0
    normal_cam[invalid] = 0.0

    labels = labels.reshape(height, width)
    keys = (index * 64 + labels.ravel() + 1).reshape(height, width)
    ignore = _boundary(keys) & (pix.random((height, width)) < 0.5)
    labels = np.where(ignore, -1, labels)
    out = {
        "image": image,
        "label": labels.astype(np.float32),
        "depth": depth[..., None].astype(np.float32),
        "normal": normal_cam.astype(np.float32),
    }
    return out, scene, hits


def render_indoor_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """One NYUv2-format scene: ``{"image", "label", "depth", "normal"}`` (see the module
    docstring for shapes, dtypes and conventions). A room (floor, ceiling, four walls)
    with furniture boxes, books, spheres and wall decorations (painting, TV, window),
    seen from a random camera inside it."""
    return _render_indoor(rng, height, width)[0]


# --------------------------------------------------------------------------- street


def _person(prims, base, yaw, height, label, shirt, pants, skin):
    """A stacked box/sphere figure standing at ``base`` (x, y, z of the soles)."""
    R = _rot_z(yaw)
    leg_h, torso_h = 0.47 * height, 0.33 * height
    head_r = 0.065 * height
    shoulder = 0.11 * height

    def box(offset, half, part, color):
        prims.append(
            Box(np.asarray(base) + R @ np.asarray(offset), half, yaw, label, part=part, color=color)
        )

    for side in (-1, 1):
        box(
            (0, side * 0.05 * height, leg_h / 2),
            (0.045 * height, 0.042 * height, leg_h / 2),
            LEGS,
            pants,
        )
        box(
            (0, side * (shoulder + 0.03 * height), leg_h + torso_h - 0.19 * height),
            (0.03 * height, 0.028 * height, 0.19 * height),
            ARMS,
            tuple(0.85 * np.asarray(shirt)),
        )
    box((0, 0, leg_h + torso_h / 2), (0.06 * height, shoulder, torso_h / 2), TORSO, shirt)
    prims.append(
        Sphere(
            np.asarray(base) + np.array([0, 0, leg_h + torso_h + 0.01 * height + head_r]),
            head_r,
            label,
            part=HEAD,
            color=skin,
        )
    )


def _vehicle(prims, rng, x, y, yaw, label):
    """Box-shaped vehicle(s) with part rules in ``meta`` (see ``_vehicle_parts``)."""
    R = _rot_z(yaw)
    base = np.array([x, y, 0.0])
    body_color = (
        tuple(rng.uniform(0.05, 0.95, 3))
        if rng.random() < 0.7
        else tuple(np.full(3, rng.uniform(0.1, 0.9)))
    )

    def box(offset, half, **meta):
        prims.append(
            Box(
                base + R @ np.asarray(offset),
                half,
                yaw,
                label,
                tag="vehicle",
                color=body_color,
                meta=meta,
            )
        )

    if label == CAR:
        length, width, body_h = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(0.7, 0.9)
        rw = 0.32
        wheels = (length / 2 - 0.85, -(length / 2 - 0.85))
        box(
            (0, 0, body_h / 2),
            (length / 2, width / 2, body_h / 2),
            style="body",
            wheels=wheels,
            rw=rw,
        )
        cab_l, cab_h = length * rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.6)
        box(
            (-0.05 * length, 0, body_h + cab_h / 2),
            (cab_l / 2, width * 0.45, cab_h / 2),
            style="cabin",
        )
        return length
    if label == BUS:
        length, width, h = rng.uniform(10, 12.5), 2.5, rng.uniform(2.9, 3.2)
        box(
            (0, 0, h / 2),
            (length / 2, width / 2, h / 2),
            style="bus",
            wheels=(length / 2 - 2.2, -(length / 2 - 3.0)),
            rw=0.5,
        )
        return length
    if label == TRUCK:
        cab_l, cargo_l, width = 2.0, rng.uniform(4.5, 7.0), 2.4
        box(
            (cargo_l / 2 + 0.1, 0, 1.3),
            (cab_l / 2, width / 2 - 0.05, 1.3),
            style="cab",
            wheels=(0.0,),
            rw=0.5,
        )
        box(
            (-cab_l / 2, 0, 1.6),
            (cargo_l / 2, width / 2, 1.6),
            style="cargo",
            wheels=(-(cargo_l / 2 - 1.0), -(cargo_l / 2 - 2.1)),
            rw=0.5,
        )
        return cab_l + cargo_l
    # motorcycle / bicycle with a rider
    length, width, h, rw = (
        (2.0, 0.35, 1.0, 0.32) if label == MOTORCYCLE else (1.75, 0.12, 0.9, 0.34)
    )
    box(
        (0, 0, h / 2),
        (length / 2, width / 2, h / 2),
        style="bike",
        wheels=(length / 2 - rw, -(length / 2 - rw)),
        rw=rw,
        light=label == MOTORCYCLE,
    )
    shirt = tuple(rng.uniform(0.05, 0.9, 3))
    rider_h = rng.uniform(1.6, 1.85)
    _person(
        prims,
        base + np.array([0, 0, h - 0.47 * rider_h + 0.05]),
        yaw,
        rider_h,
        RIDER,
        shirt,
        tuple(rng.uniform(0.05, 0.5, 3)),
        (0.85, 0.66, 0.52),
    )
    return length


def _vehicle_parts(local: np.ndarray, half: np.ndarray, meta: dict) -> np.ndarray:
    """Part ids of hit points on a vehicle box, from their local coordinates (x along the
    heading, y to the left, z up; origin at the box centre)."""
    style = meta["style"]
    axis = np.argmax(np.abs(local) / half, axis=-1)
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    h = z + half[2]  # height above the box's bottom
    H = 2 * half[2]
    side, end, top = axis == 1, axis == 0, (axis == 2) & (z > 0)
    part = np.full(len(local), CHASSIS)
    if style == "cabin":
        rows = (h > 0.06) & (h < H - 0.07)  # pillars and sills frame the glass
        part[side & rows & (np.abs(x) < half[0] - 0.1)] = P_WINDOW
        part[end & rows & (np.abs(y) < half[1] - 0.08)] = P_WINDOW
        part[top] = OTHER
    elif style in ("bus", "cab"):
        band = (h > 0.45 * H) & (h < 0.88 * H)
        front = end & (x > 0)
        part[side & band & (np.abs(x) < half[0] - 0.25)] = P_WINDOW
        part[(front if style == "cab" else end) & band & (np.abs(y) < half[1] - 0.12)] = P_WINDOW
        part[top] = OTHER
    elif style == "cargo":
        part[top] = OTHER
    if style in ("body", "bus", "cab") or meta.get("light"):
        lamp_lo, lamp_hi = (0.55 * H, 0.82 * H) if style == "body" else (0.15 * H, 0.27 * H)
        if style == "bike":
            lamp_lo, lamp_hi = 0.6 * H, 0.8 * H
        lamp = (
            end
            & (h > lamp_lo)
            & (h < lamp_hi)
            & (np.abs(y) > half[1] - 0.32)
            & (np.abs(y) < half[1] - 0.04)
        )
        if style == "bike":
            lamp = end & (x > 0) & (h > lamp_lo) & (h < lamp_hi)
        part[lamp] = LIGHT
    if style in ("body", "bus", "cab", "cargo"):
        plate_h = 0.4 * H if style == "body" else 0.12 * H
        part[end & (np.abs(y) < 0.26) & (np.abs(h - plate_h) < 0.055)] = PLATE
    wheels, rw = meta.get("wheels", ()), meta.get("rw", 0.0)
    for xw in wheels:
        part[side & ((x - xw) ** 2 + (h - rw) ** 2 < rw**2)] = WHEEL
    if wheels and style != "bike":
        part[end & (np.abs(y) > half[1] - 0.25) & (h < 0.8 * rw)] = WHEEL
    if style == "bike":
        part[end & (h < 2 * rw)] = WHEEL
    return part


_PART_COLORS = {
    P_WINDOW: (0.12, 0.16, 0.22),
    WHEEL: (0.04, 0.04, 0.04),
    LIGHT: (1.0, 0.93, 0.65),
    PLATE: (0.93, 0.93, 0.88),
}


def _street_geometry(rng: np.random.Generator) -> dict:
    lanes = int(rng.integers(1, 3))  # per direction
    lane_w = rng.uniform(3.0, 3.6)
    road_half = lanes * lane_w
    sidewalk_w = rng.uniform(1.8, 4.0)
    curb = 0.15
    prims: list[Primitive] = [Plane((0, 0, 0), (0, 0, 1), ROAD, tag="ground")]
    for s in (-1, 1):
        prims.append(
            Box(
                (s * (road_half + sidewalk_w / 2), 150.0, curb / 2),
                (sidewalk_w / 2, 260.0, curb / 2),
                0.0,
                SIDEWALK,
            )
        )
    cam_lane = int(rng.integers(lanes))
    cam_x = lane_w * (cam_lane + 0.5) + rng.uniform(-0.4, 0.4)
    camera = Camera(
        np.array([cam_x, 0.0, rng.uniform(1.2, 1.6)]),
        _camera_rotation(
            np.pi / 2 + rng.normal(0, 0.04), rng.uniform(-0.05, 0.03), rng.uniform(-0.02, 0.02)
        ),
        1.0,
    )
    y_end = rng.uniform(60, 200)
    for s in (-1, 1):  # buildings, with gaps holding fences, walls, trees
        x0 = road_half + sidewalk_w + rng.uniform(0.0, 3.0)
        y = -20.0
        while y < y_end:
            length = rng.uniform(8, 30)
            if rng.random() < 0.22:
                length = rng.uniform(3, 12)
                what = rng.integers(3)
                if what == 0:
                    h = rng.uniform(1.0, 2.0)
                    prims.append(
                        Box(
                            (s * (x0 + 0.05), y + length / 2, h / 2),
                            (0.05, length / 2, h / 2),
                            0.0,
                            FENCE,
                        )
                    )
                elif what == 1:
                    h = rng.uniform(1.2, 3.0)
                    prims.append(
                        Box(
                            (s * (x0 + 0.15), y + length / 2, h / 2),
                            (0.15, length / 2, h / 2),
                            0.0,
                            CS_WALL,
                        )
                    )
                else:
                    r = rng.uniform(1.5, min(3.5, length / 2 + 1))
                    prims.append(Sphere((s * (x0 + r), y + length / 2, r * 0.9), r, VEGETATION))
            else:
                setback = rng.uniform(0.0, 1.5)
                h = rng.uniform(6, 28)
                depth = rng.uniform(8, 20)
                shade = rng.uniform(0.6, 1.2)
                color = tuple(
                    np.clip(
                        np.array(_STREET_MATERIALS[BUILDING][0]) * shade * rng.uniform(0.8, 1.2, 3),
                        0,
                        1,
                    )
                )
                prims.append(
                    Box(
                        (s * (x0 + setback + depth / 2), y + length / 2, h / 2),
                        (depth / 2, length / 2, h / 2),
                        0.0,
                        BUILDING,
                        color=color,
                    )
                )
            y += length
    if rng.random() < 0.6:  # the street ends at a building
        h = rng.uniform(8, 30)
        prims.append(
            Box((0.0, y_end + rng.uniform(10, 40) + 10, h / 2), (80.0, 10.0, h / 2), 0.0, BUILDING)
        )

    for s in (-1, 1):  # poles with signs / lights, and trees on the sidewalk
        y = rng.uniform(3, 15)
        while y < min(y_end, 90):
            if rng.random() < 0.55:
                h = rng.uniform(3.0, 6.0)
                px = s * (road_half + 0.35)
                prims.append(Box((px, y, h / 2), (0.07, 0.07, h / 2), 0.0, POLE))
                what = rng.random()
                if what < 0.35:
                    prims.append(Box((px, y, h + 0.3), (0.03, 0.35, 0.3), 0.0, TRAFFIC_SIGN))
                elif what < 0.65:
                    prims.append(
                        Box((px - s * 0.1, y, h - 0.2), (0.15, 0.15, 0.45), 0.0, TRAFFIC_LIGHT)
                    )
            else:
                tx = s * (road_half + sidewalk_w - rng.uniform(0.6, 1.2))
                trunk = rng.uniform(1.8, 3.0)
                r = rng.uniform(1.0, 2.2)
                prims.append(
                    Box(
                        (tx, y, trunk / 2),
                        (0.12, 0.12, trunk / 2),
                        0.0,
                        VEGETATION,
                        color=(0.30, 0.22, 0.14),
                    )
                )
                prims.append(Sphere((tx, y, trunk + 0.7 * r), r, VEGETATION))
            y += rng.uniform(8, 25)

    occupied: list[tuple[float, float, float]] = []  # (x, y0, y1) of vehicles

    def free(x, y0, y1):
        return all(abs(x - ox) > 1.5 or y1 + 1.0 < a or y0 - 1.0 > b for ox, a, b in occupied)

    def kind():
        r = rng.random()
        return (
            CAR
            if r < 0.72
            else TRUCK
            if r < 0.82
            else BUS
            if r < 0.88
            else MOTORCYCLE
            if r < 0.94
            else BICYCLE
        )

    for s in (-1, 1):  # parked along the curbs
        y = rng.uniform(4, 12)
        while y < 80:
            if rng.random() < 0.65:
                label = kind()
                if label in (MOTORCYCLE, BICYCLE):
                    label = CAR
                x = s * (road_half - 1.1)
                length = _vehicle(
                    prims,
                    rng,
                    x,
                    y + 3,
                    np.pi / 2 + rng.normal(0, 0.03) + (np.pi if s < 0 else 0),
                    label,
                )
                occupied.append((x, y + 3 - length / 2, y + 3 + length / 2))
                y += length + rng.uniform(0.8, 4)
            else:
                y += rng.uniform(3, 10)
    for _ in range(rng.integers(0, 5)):  # traffic in the lanes
        lane = int(rng.integers(-lanes, lanes))
        x = lane_w * (lane + 0.5)
        if abs(lane_w * (lane + 0.5) - cam_x) < 1.6 * lane_w / 2:
            y = rng.uniform(9, 70)
        else:
            y = rng.uniform(5, 70)
        label = kind()
        heading = np.pi / 2 if lane >= 0 else -np.pi / 2
        if free(x, y - 7, y + 7):
            length = _vehicle(
                prims, rng, x + rng.uniform(-0.3, 0.3), y, heading + rng.normal(0, 0.03), label
            )
            occupied.append((x, y - length / 2, y + length / 2))
    for _ in range(rng.integers(0, 7)):  # pedestrians, mostly on the sidewalks
        if rng.random() < 0.85:
            s = 1 if rng.random() < 0.5 else -1
            base = (
                s * rng.uniform(road_half + 0.5, road_half + sidewalk_w - 0.3),
                rng.uniform(4, 50),
                curb,
            )
        else:
            base = (rng.uniform(-road_half, road_half), rng.uniform(10, 40), 0.0)
            if not free(base[0], base[1] - 1, base[1] + 1):
                continue
        _person(
            prims,
            np.array(base),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(1.55, 1.95),
            PERSON,
            tuple(rng.uniform(0.05, 0.9, 3)),
            tuple(rng.uniform(0.05, 0.5, 3)),
            tuple(np.array([0.85, 0.66, 0.52]) * rng.uniform(0.55, 1.1)),
        )

    sun_el, sun_az = rng.uniform(0.35, 1.1), rng.uniform(0, 2 * np.pi)
    sun = np.array(
        [math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)]
    )
    jitter = {lab: rng.uniform(0.85, 1.15, 3) for lab in range(19)}
    return {
        "prims": prims,
        "camera": camera,
        "road_half": road_half,
        "lane_w": lane_w,
        "lanes": lanes,
        "sun": sun,
        "jitter": jitter,
        "salt": int(rng.integers(1 << 31)),
        "sky": (rng.uniform(0.45, 0.7), rng.uniform(0.6, 0.8), rng.uniform(0.85, 1.0)),
    }


def _render_street(rng: np.random.Generator, height: int, width: int):
    _check_size(height, width)
    geo, pix = rng.spawn(2)
    scene = _street_geometry(geo)
    camera: Camera = scene["camera"]
    camera.focal = STREET_FOCAL_PER_WIDTH * width
    prims = scene["prims"]
    dirs = camera.rays(height, width)
    hits = _raycast(
        camera.position,
        dirs,
        prims,
        t_max=STREET_MAX_DISTANCE,
        candidates=camera.candidates(prims, height, width),
    )
    index, points = hits.index, hits.point
    n = len(index)
    labels = np.array([p.label for p in prims] + [SKY])[index]
    parts = np.array([p.part for p in prims] + [-1])[index]
    ground = np.flatnonzero(index == 0)
    labels[ground[np.abs(points[ground, 0]) > scene["road_half"]]] = TERRAIN

    albedo = _albedo(
        points, index, labels, prims, _STREET_MATERIALS, scene["jitter"], scene["salt"]
    )
    for k in np.unique(index[index >= 0]):
        prim = prims[k]
        if prim.tag != "vehicle":
            continue
        sel = np.flatnonzero(index == k)
        p = _vehicle_parts(prim.to_local(points[sel]), prim.half, prim.meta)
        parts[sel] = p
        for part_id, color in _PART_COLORS.items():
            albedo[sel[p == part_id]] = color
        albedo[sel[p == OTHER]] *= 0.7
    road = ground[np.abs(points[ground, 0]) <= scene["road_half"]]
    gx, gy = points[road, 0], points[road, 1]
    marks = np.abs(gx) < 0.08  # centre line
    for lane in range(1, scene["lanes"]):
        marks |= (np.abs(np.abs(gx) - lane * scene["lane_w"]) < 0.07) & (np.mod(gy, 9.0) < 3.0)
    marks |= np.abs(np.abs(gx) - (scene["road_half"] - 0.25)) < 0.06
    albedo[road[marks]] = (0.9, 0.9, 0.88)

    shade = 0.45 + 0.65 * np.maximum(hits.normal @ scene["sun"], 0.0)
    radiance = albedo * shade[:, None]
    sky = index < 0
    elevation = np.clip(dirs[sky, 2] / np.linalg.norm(dirs[sky], axis=-1), 0.0, 1.0)
    sky_color = np.asarray(scene["sky"])
    radiance[sky] = (1 - elevation[:, None]) * np.array([0.88, 0.9, 0.93]) + elevation[
        :, None
    ] * sky_color
    image = _finish_image(radiance, pix, height, width)

    disparity = np.where(sky, -1.0, DISPARITY_SCALE / np.where(sky, 1.0, hits.t)).reshape(
        height, width
    )
    labels = labels.reshape(height, width)
    parts = parts.reshape(height, width)
    keys = (index * 64 + labels.ravel() + 1).reshape(height, width)
    ignore = _boundary(keys) & (pix.random((height, width)) < 0.25)
    labels = np.where(ignore, -1, labels)
    parts = np.where(ignore, -1, parts)
    out = {
        "image": image,
        "label_19": labels.astype(np.float32),
        "part_seg": parts.astype(np.float32),
        "depth": disparity[..., None].astype(np.float32),
    }
    assert n == height * width
    return out, scene, hits


def render_street_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """One Cityscapes-format scene: ``{"image", "label_19", "part_seg", "depth"}`` (see
    the module docstring). A road with sidewalks, buildings, poles, trees, parked and
    moving vehicles and pedestrians under the sky, from a car-mounted camera."""
    return _render_street(rng, height, width)[0]


# --------------------------------------------------------------------------- files


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of every other scene."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(seed) != seed or seed < 0 or index < 0:
        raise ValueError(f"seed and index must be integers >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index)])
    )


def _resolve(kind: str, height: int | None, width: int | None) -> tuple[int, int]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    h, w = DEFAULT_SIZE[kind]
    height, width = h if height is None else height, w if width is None else width
    _check_size(height, width)
    return int(height), int(width)


def render_example(
    kind: str,
    seed: int,
    split: str,
    index: int,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """Scene ``index`` of ``split`` exactly as ``write_scenes`` writes it."""
    height, width = _resolve(kind, height, width)
    render = render_indoor_scene if kind == "nyuv2" else render_street_scene
    return render(scene_rng(seed, split, index), height, width)


def _is_complete(root: Path, kind: str, counts: dict[str, int]) -> bool:
    for split, n in counts.items():
        for name in FIELDS[kind]:
            folder = root / split / name
            if (
                not folder.is_dir()
                or len(os.listdir(folder)) != n
                or not (folder / f"{n - 1}.npy").is_file()
            ):
                return False
    return True


def _generate(
    root: Path,
    kind: str,
    num_train: int,
    num_val: int,
    height: int | None,
    width: int | None,
    seed: int,
    exist_ok: bool,
) -> Path:
    height, width = _resolve(kind, height, width)
    for name, n in (("num_train", num_train), ("num_val", num_val)):
        if int(n) != n or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    root = Path(root).expanduser()
    counts = {"train": int(num_train), "val": int(num_val)}

    def occupied() -> bool:
        return root.exists() and (not root.is_dir() or any(root.iterdir()))

    if occupied():
        if exist_ok and root.is_dir() and _is_complete(root, kind, counts):
            return root
        raise DataError(
            f"{root}: already exists and is not empty; choose a new folder or remove it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        total, done = sum(counts.values()), 0
        step = max(1, math.ceil(total / 10))
        for split, n in counts.items():
            for name in FIELDS[kind]:
                (tmp / split / name).mkdir(parents=True)
            for i in range(n):
                example = render_example(kind, seed, split, i, height, width)
                for name in FIELDS[kind]:
                    np.save(tmp / split / name / f"{i}.npy", example[name])
                done += 1
                if total > 8 and (done % step == 0 or done == total):
                    print(
                        f"synthetic {kind} {height}x{width}: {done}/{total} scenes -> {root}",
                        file=sys.stderr,
                        flush=True,
                    )
        try:
            os.replace(tmp, root)  # atomic; replaces only an empty folder
        except OSError:
            if exist_ok and root.is_dir() and _is_complete(root, kind, counts):
                return root  # another process won the race; ours is discarded below
            raise DataError(
                f"{root}: appeared and is not empty while generating; not overwritten"
            ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_scenes(
    root,
    *,
    kind: str = "nyuv2",
    num_train: int = 64,
    num_val: int = 16,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``num_train`` + ``num_val`` scenes of ``kind`` ("nyuv2" or "cityscapes") in
    its folder layout into ``root`` and return ``root``. Default size 96x128 (nyuv2) or
    64x128 (cityscapes). The files are written into a temporary sibling folder that is
    renamed to ``root`` at the end, so ``root`` is never half-written. Raises
    ``DataError`` (a ``ValueError``) if ``root`` exists and is not empty."""
    return _generate(Path(root), kind, num_train, num_val, height, width, seed, exist_ok=False)


def synthetic_root(
    kind: str = "nyuv2",
    *,
    num_train: int = 64,
    num_val: int = 16,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    cache_dir=None,
) -> Path:
    """A cached synthetic data folder: generated once under ``cache_dir`` (default
    ``common.cache_root() / "synthetic"``) in a subfolder named after kind, size, counts,
    seed and ``GENERATOR_VERSION``, and returned as is afterwards. Safe if processes race."""
    height, width = _resolve(kind, height, width)
    cache = (
        Path(cache_dir).expanduser() if cache_dir is not None else common.cache_root() / "synthetic"
    )
    name = f"{kind}_{height}x{width}_train{num_train}_val{num_val}_seed{seed}_v{GENERATOR_VERSION}"
    return _generate(cache / name, kind, num_train, num_val, height, width, seed, exist_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.synthetic",
        description="Write procedural ray-cast scenes in the NYUv2 or Cityscapes .npy folder "
        "format (root/{train,val}/<field>/{i}.npy) for testing and demos.",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="nyuv2",
        help="nyuv2: indoor rooms with image/label/depth/normal; cityscapes: streets "
        "with image/label_19/part_seg/depth (disparity). Default: nyuv2",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder to create (must not exist or be empty). Default: the cache folder "
        "under $DGR_JAX_CACHE (or ~/.cache/dgr_jax)/synthetic, reused if already generated",
    )
    parser.add_argument("--num_train", type=int, default=64, help="scenes in train/ (default 64)")
    parser.add_argument("--num_val", type=int, default=16, help="scenes in val/ (default 16)")
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in pixels (default 96 for nyuv2, 64 for cityscapes)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="image width in pixels (default 128)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="scene seed (integer >= 0); the same seed gives the same files (default 0)",
    )
    args = parser.parse_args(argv)
    try:
        if args.out is None:
            root = synthetic_root(
                args.kind,
                num_train=args.num_train,
                num_val=args.num_val,
                height=args.height,
                width=args.width,
                seed=args.seed,
            )
        else:
            root = write_scenes(
                args.out,
                kind=args.kind,
                num_train=args.num_train,
                num_val=args.num_val,
                height=args.height,
                width=args.width,
                seed=args.seed,
            )
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
