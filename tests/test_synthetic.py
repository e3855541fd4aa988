"""The procedural scene generator: ray casting against hand-built geometry with
closed-form answers, the rendered scenes' internal consistency (depth = camera z of the
hit, normals = analytic surface normals, invalid pixels), the on-disk layout, the
determinism and the cache."""

import os
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import synthetic as syn

H, W = 24, 32


def grid_rays(height, width, focal):
    """Independent pixel rays: camera at the origin, camera frame = world frame."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    x = (cols + 0.5 - width / 2) / focal
    y = (rows + 0.5 - height / 2) / focal
    return np.stack([x, y, np.ones_like(x)], -1).reshape(-1, 3)


# --------------------------------------------------------------------------- ray casting


def test_wall_facing_camera_gives_constant_depth_and_normal_towards_camera():
    dirs = grid_rays(H, W, focal=20.0)
    for normal in [(0, 0, 1), (0, 0, -1)]:  # the sign given does not matter: normals face the ray
        hits = syn._raycast(np.zeros(3), dirs, [syn.Plane((3, -2, 5), normal)])
        np.testing.assert_allclose(hits.t, 5.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(hits.point[:, 2], 5.0, atol=1e-12)
        np.testing.assert_array_equal(hits.index, 0)
        np.testing.assert_allclose(
            hits.normal, np.tile([0.0, 0.0, -1.0], (len(dirs), 1)), atol=1e-15
        )


def test_tilted_plane_depth_matches_closed_form():
    # plane z = c + a x + b y; a ray (x, y, 1) t meets it at t = c / (1 - a x - b y)
    a, b, c = 0.3, -0.2, 4.0
    dirs = grid_rays(H, W, focal=25.0)
    hits = syn._raycast(np.zeros(3), dirs, [syn.Plane((0, 0, c), (-a, -b, 1.0))])
    expected = c / (1 - a * dirs[:, 0] - b * dirs[:, 1])
    np.testing.assert_allclose(hits.t, expected, rtol=1e-12)
    n = np.array([a, b, -1.0]) / np.linalg.norm([a, b, -1.0])  # facing the camera: z < 0
    np.testing.assert_allclose(hits.normal, np.tile(n, (len(dirs), 1)), atol=1e-12)


def test_sphere_in_front_of_wall_nearest_hit():
    centre, r, wall = np.array([0.4, -0.3, 3.0]), 0.8, 6.0
    dirs = grid_rays(H, W, focal=20.0)
    prims = [syn.Plane((0, 0, wall), (0, 0, 1), label=11), syn.Sphere(centre, r, label=6)]
    hits = syn._raycast(np.zeros(3), dirs, prims)
    unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    # distance from the centre to each ray's line
    dist = np.linalg.norm(centre - (unit @ centre)[:, None] * unit, axis=1)
    on_sphere = dist < r - 1e-6
    assert 20 < on_sphere.sum() < len(dirs) - 20
    np.testing.assert_array_equal(hits.index, np.where(on_sphere, 1, 0))
    np.testing.assert_allclose(hits.t[~on_sphere], wall, atol=1e-12)
    p = hits.point[on_sphere]
    np.testing.assert_allclose(np.linalg.norm(p - centre, axis=1), r, atol=1e-9)
    # the near side: the chord's midpoint is further along the ray than the hit
    along = np.linalg.norm(unit[on_sphere] * (unit[on_sphere] @ centre)[:, None], axis=1)
    assert np.all(np.linalg.norm(p, axis=1) <= along + 1e-12)
    np.testing.assert_allclose(hits.normal[on_sphere], (p - centre) / r, atol=1e-9)
    np.testing.assert_allclose(
        np.linalg.norm(hits.point - hits.t[:, None] * dirs, axis=1), 0, atol=1e-12
    )


def test_box_front_face_and_misses():
    dirs = grid_rays(H, W, focal=10.0)
    box = syn.Box((0.2, 0.1, 4.0), (1.0, 0.5, 0.5))
    hits = syn._raycast(np.zeros(3), dirs, [box])
    front = 3.5
    x, y = dirs[:, 0] * front, dirs[:, 1] * front  # where each ray crosses the front face's plane
    inside = (np.abs(x - 0.2) < 1.0 - 1e-9) & (np.abs(y - 0.1) < 0.5 - 1e-9)
    np.testing.assert_allclose(hits.t[inside], front, atol=1e-12)
    np.testing.assert_allclose(
        hits.normal[inside], np.tile([0, 0, -1.0], (inside.sum(), 1)), atol=1e-15
    )
    # rays that miss the box's silhouette entirely (beyond the back face's projection too)
    back = 4.5
    far = ((np.abs(dirs[:, 0] * front - 0.2) > 1.0) & (np.abs(dirs[:, 0] * back - 0.2) > 1.0)) | (
        (np.abs(dirs[:, 1] * front - 0.1) > 0.5) & (np.abs(dirs[:, 1] * back - 0.1) > 0.5)
    )
    assert far.any() and inside.any()
    assert np.all(np.isinf(hits.t[far])) and np.all(hits.index[far] == -1)
    np.testing.assert_array_equal(hits.normal[far], 0.0)


def test_rotated_box_hits_lie_on_its_surface_with_face_normals():
    dirs = grid_rays(H, W, focal=10.0)
    origin = np.array([0.0, 0.0, -1.0])
    yaw = 0.6
    box = syn.Box((0.3, 0.0, 2.0), (1.0, 0.7, 0.9), yaw=yaw)
    hits = syn._raycast(origin, dirs, [box])
    hit = hits.index == 0
    assert hit.sum() > 50
    c, s = np.cos(yaw), np.sin(yaw)
    axes = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # the box's own axes, rows
    local = (hits.point[hit] - box.center) @ axes.T
    ratio = np.abs(local) / box.half
    np.testing.assert_allclose(ratio.max(axis=1), 1.0, atol=1e-9)
    face = ratio.argmax(axis=1)
    expected = np.sign(local[np.arange(len(face)), face])[:, None] * axes[face]
    np.testing.assert_allclose(hits.normal[hit], expected, atol=1e-12)
    assert np.all((hits.normal[hit] * dirs[hit]).sum(1) < 0)


def test_screen_culling_is_exact():
    rng = np.random.default_rng(3)
    camera = syn.Camera(np.array([0.5, -1.0, 1.3]), syn._camera_rotation(1.2, -0.2, 0.05), 30.0)
    prims = [syn.Plane((0, 0, 0), (0, 0, 1))]
    for _ in range(25):
        centre = camera.position + rng.uniform(-6, 6, 3)
        if rng.random() < 0.5:
            prims.append(syn.Box(centre, rng.uniform(0.1, 1.5, 3), rng.uniform(0, 3)))
        else:
            prims.append(syn.Sphere(centre, rng.uniform(0.1, 1.5)))
    dirs = camera.rays(H, W)
    full = syn._raycast(camera.position, dirs, prims)
    culled = syn._raycast(camera.position, dirs, prims, candidates=camera.candidates(prims, H, W))
    np.testing.assert_array_equal(full.index, culled.index)
    np.testing.assert_array_equal(full.t, culled.t)


def test_camera_rotation_is_a_rotation_with_y_down():
    R = syn._camera_rotation(0.7, -0.3, 0.1)
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(R), 1.0)
    level = syn._camera_rotation(2.0, 0.0, 0.0)
    np.testing.assert_allclose(level[:, 1], [0, 0, -1], atol=1e-15)  # camera y = world down
    np.testing.assert_allclose(level[:, 2], [np.cos(2.0), np.sin(2.0), 0], atol=1e-15)


# --------------------------------------------------------------------------- rendered scenes


def analytic_world_normal(prim, point):
    if isinstance(prim, syn.Plane):
        return prim.normal
    if isinstance(prim, syn.Sphere):
        return (point - prim.center) / prim.radius
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    axes = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    local = axes @ (point - prim.center)
    k = int(np.argmax(np.abs(local) / prim.half))
    return axes[k]


def on_surface_residual(prim, point):
    if isinstance(prim, syn.Plane):
        return abs(np.dot(point - prim.point, prim.normal))
    if isinstance(prim, syn.Sphere):
        return abs(np.linalg.norm(point - prim.center) - prim.radius)
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    local = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]) @ (point - prim.center)
    return abs(np.max(np.abs(local) / prim.half) - 1.0)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_indoor_depth_and_normals_are_exact_for_the_geometry(index):
    out, scene, hits = syn._render_indoor(syn.scene_rng(7, "train", index), H, W)
    camera = scene["camera"]
    assert np.isclose(camera.focal, (W / 2) / np.tan(np.radians(30)))
    depth, normal = out["depth"][..., 0].astype(np.float64), out["normal"].astype(np.float64)
    valid = depth > 0
    assert np.all(hits.index >= 0)  # a closed room: every ray hits something
    # depth is the camera-frame z of the hit point
    rel = hits.point - camera.position
    cam_xyz = rel @ camera.rotation
    np.testing.assert_allclose(depth[valid], cam_xyz[:, 2].reshape(H, W)[valid], rtol=1e-6)
    # the hit point projects back onto its own pixel centre
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    np.testing.assert_allclose(
        (camera.focal * cam_xyz[:, 0] / cam_xyz[:, 2] + W / 2).reshape(H, W), cols + 0.5, atol=1e-9
    )
    np.testing.assert_allclose(
        (camera.focal * cam_xyz[:, 1] / cam_xyz[:, 2] + H / 2).reshape(H, W), rows + 0.5, atol=1e-9
    )
    flat_n = normal.reshape(-1, 3)
    for i in np.flatnonzero(valid.ravel()):
        prim, p = scene["prims"][hits.index[i]], hits.point[i]
        assert on_surface_residual(prim, p) < 1e-9
        n_world = analytic_world_normal(prim, p)
        n_cam = camera.rotation.T @ n_world
        n_cam = -n_cam if np.dot(n_world, rel[i]) > 0 else n_cam  # towards the camera
        np.testing.assert_allclose(flat_n[i], n_cam, atol=1e-6)
    # unit normals where valid, zero exactly where depth is 0
    np.testing.assert_allclose(np.linalg.norm(normal[valid], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.all(normal == 0, axis=-1), ~valid)
    # facing the camera: normal . ray < 0
    rays = syn._pixel_rays(H, W, camera.focal).reshape(H, W, 3)
    assert np.all((normal * rays).sum(-1)[valid] < 0)


def test_indoor_labels_windows_and_invalid_pixels():
    seen = set()
    for i in range(6):
        out = syn.render_example("nyuv2", 11, "train", i, H, W)
        assert set(out) == {"image", "label", "depth", "normal"}
        assert out["image"].shape == (H, W, 3) and out["label"].shape == (H, W)
        assert out["depth"].shape == (H, W, 1) and out["normal"].shape == (H, W, 3)
        assert all(v.dtype == np.float32 for v in out.values())
        label, depth = out["label"], out["depth"][..., 0]
        np.testing.assert_array_equal(label, np.round(label))
        assert label.min() >= -1 and label.max() <= 12
        assert np.all(depth[label == syn.WINDOW] == 0)  # glass: no depth
        assert np.mean(depth[label != syn.WINDOW] == 0) < 0.2  # holes are few
        assert 0 <= out["image"].min() and out["image"].max() <= 1
        assert (label == -1).mean() < 0.3
        seen |= set(np.unique(label).astype(int))
    assert {syn.FLOOR, syn.WALL} <= seen and len(seen) >= 6


def test_indoor_floor_normals_point_up_in_the_camera_frame():
    out, scene, hits = syn._render_indoor(syn.scene_rng(0, "val", 4), H, W)
    floor = (hits.index == 0).reshape(H, W) & (out["depth"][..., 0] > 0)
    assert floor.any()
    expected = scene["camera"].rotation.T @ np.array([0, 0, 1.0])  # world up in camera coordinates
    np.testing.assert_allclose(out["normal"][floor], np.tile(expected, (floor.sum(), 1)), atol=1e-6)
    assert expected[1] < -0.8  # up is -y: pitch and roll are small


def test_street_disparity_sky_and_parts():
    classes = set()
    for i in range(8):
        out, scene, hits = syn._render_street(syn.scene_rng(2, "train", i), H, W)
        assert set(out) == {"image", "label_19", "part_seg", "depth"}
        assert all(v.dtype == np.float32 for v in out.values())
        assert out["depth"].shape == (H, W, 1)
        label, part, disp = out["label_19"], out["part_seg"], out["depth"][..., 0]
        assert label.min() >= -1 and label.max() <= 18 and part.min() >= -1 and part.max() <= 9
        np.testing.assert_array_equal(label, np.round(label))
        np.testing.assert_array_equal(part, np.round(part))
        sky = (hits.index < 0).reshape(H, W)
        assert sky.any()
        np.testing.assert_array_equal(disp == -1, sky)  # -1 exactly on the sky
        assert np.all(np.isin(label[sky], [syn.SKY, -1])) and np.all(sky[label == syn.SKY])
        camera = scene["camera"]
        z = ((hits.point - camera.position) @ camera.rotation[:, 2]).reshape(H, W)
        np.testing.assert_allclose(disp[~sky], syn.DISPARITY_SCALE / z[~sky], rtol=1e-6)
        assert np.isclose(syn.DISPARITY_SCALE, 0.209313 * 2262.05 / 8)
        # parts exactly on people and vehicles; human parts on humans, vehicle parts on vehicles
        thing = (label >= syn.PERSON) & (label <= syn.BICYCLE)
        labelled = label >= 0
        np.testing.assert_array_equal(part[labelled] >= 0, thing[labelled])
        assert np.all(part[label == -1] == -1)
        human = np.isin(label, [syn.PERSON, syn.RIDER])
        rider_or_bike_part = part[human]
        assert np.all((rider_or_bike_part >= 0) & (rider_or_bike_part <= 3))
        vehicle = (label >= syn.CAR) & (label <= syn.BICYCLE)
        assert np.all(part[vehicle] >= 4)
        classes |= set(np.unique(label).astype(int))
    assert {syn.ROAD, syn.SKY, syn.BUILDING} <= classes


def test_vehicle_part_rules():
    half = np.array([2.2, 0.9, 0.4])  # a car body: 4.4 m long, 0.8 m tall
    meta = {"style": "body", "wheels": (1.35, -1.35), "rw": 0.32}
    pts = np.array(
        [
            [1.35, 0.9, 0.32 - 0.4],  # side face at a wheel's centre
            [0.0, -0.9, 0.1],  # side face between the wheels
            [2.2, 0.0, 0.4 * 0.8 - 0.4],  # front face, plate height, centre
            [2.2, 0.75, 0.55 * 0.8 - 0.4 + 0.1],  # front face, lamp band, near the corner
            [0.3, 0.2, 0.4],  # bonnet
        ]
    )
    np.testing.assert_array_equal(
        syn._vehicle_parts(pts, half, meta),
        [syn.WHEEL, syn.CHASSIS, syn.PLATE, syn.LIGHT, syn.CHASSIS],
    )
    cabin = np.array([1.1, 0.8, 0.25])
    pts = np.array([[0.0, 0.8, 0.0], [0.0, 0.0, 0.25], [1.1, 0.0, 0.0], [1.05, 0.8, 0.0]])
    np.testing.assert_array_equal(
        syn._vehicle_parts(pts, cabin, {"style": "cabin"}),
        [syn.P_WINDOW, syn.OTHER, syn.P_WINDOW, syn.CHASSIS],
    )


def test_person_figure_parts_from_head_to_legs():
    prims = []
    syn._person(
        prims,
        np.array([0.0, 0.0, 0.0]),
        0.3,
        1.8,
        syn.PERSON,
        (0.8, 0.1, 0.1),
        (0.1, 0.1, 0.5),
        (0.8, 0.6, 0.5),
    )
    assert {p.label for p in prims} == {syn.PERSON}
    height, width = 48, 32
    camera = syn.Camera(np.array([-4.0, 0.0, 0.9]), syn._camera_rotation(0.0, 0.0, 0.0), 100.0)
    hits = syn._raycast(camera.position, camera.rays(height, width), prims)
    part = np.array([p.part for p in prims] + [-1])[hits.index].reshape(height, width)
    assert set(np.unique(part)) == {-1, syn.TORSO, syn.HEAD, syn.ARMS, syn.LEGS}
    rows = np.flatnonzero((part >= 0).any(axis=1))
    assert np.all(part[rows[0]][part[rows[0]] >= 0] == syn.HEAD)
    assert np.all(part[rows[-1]][part[rows[-1]] >= 0] == syn.LEGS)
    mean_row = {k: np.mean(np.nonzero(part == k)[0]) for k in (syn.HEAD, syn.TORSO, syn.LEGS)}
    assert mean_row[syn.HEAD] < mean_row[syn.TORSO] < mean_row[syn.LEGS]
    z = hits.point[:, 2].reshape(height, width)
    assert z[part == syn.HEAD].min() > 0.8 * 1.8 and z[part == syn.LEGS].max() < 0.5 * 1.8


def test_same_seed_same_bytes_other_seed_differs_and_geometry_ignores_size():
    for kind in syn.KINDS:
        a = syn.render_example(kind, 5, "train", 3, H, W)
        b = syn.render_example(kind, 5, "train", 3, H, W)
        for key in a:
            assert a[key].tobytes() == b[key].tobytes()
        c = syn.render_example(kind, 6, "train", 3, H, W)
        d = syn.render_example(kind, 5, "val", 3, H, W)
        assert (
            a["image"].tobytes() != c["image"].tobytes()
            and a["image"].tobytes() != d["image"].tobytes()
        )
    # the same scene at another resolution: same camera pose and primitives
    small = syn._render_indoor(syn.scene_rng(1, "train", 0), H, W)[1]
    large = syn._render_indoor(syn.scene_rng(1, "train", 0), 2 * H, 3 * W)[1]
    np.testing.assert_array_equal(small["camera"].rotation, large["camera"].rotation)
    np.testing.assert_array_equal(small["camera"].position, large["camera"].position)
    assert len(small["prims"]) == len(large["prims"])
    for p, q in zip(small["prims"], large["prims"]):
        assert type(p) is type(q) and p.label == q.label
        np.testing.assert_array_equal(
            getattr(p, "center", getattr(p, "point", None)),
            getattr(q, "center", getattr(q, "point", None)),
        )


# --------------------------------------------------------------------------- files


def listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", syn.KINDS)
def test_write_scenes_layout(tmp_path, kind):
    root = syn.write_scenes(
        tmp_path / "data", kind=kind, num_train=3, num_val=2, height=H, width=W, seed=1
    )
    assert root == tmp_path / "data"
    fields = {
        "nyuv2": ["depth", "image", "label", "normal"],
        "cityscapes": ["depth", "image", "label_19", "part_seg"],
    }[kind]
    expected = sorted(
        f"{split}/{f}/{i}.npy"
        for split, n in (("train", 3), ("val", 2))
        for f in fields
        for i in range(n)
    )
    assert listing(root) == expected
    assert os.listdir(tmp_path) == ["data"]  # no temporary folder left behind
    shapes = {
        "image": (H, W, 3),
        "label": (H, W),
        "label_19": (H, W),
        "part_seg": (H, W),
        "depth": (H, W, 1),
        "normal": (H, W, 3),
    }
    for f in fields:
        array = np.load(root / "val" / f / "1.npy")
        assert array.dtype == np.float32 and array.shape == shapes[f]
    example = syn.render_example(kind, 1, "val", 1, H, W)
    for f in fields:
        np.testing.assert_array_equal(np.load(root / "val" / f / "1.npy"), example[f])


def test_write_scenes_is_deterministic_and_refuses_a_non_empty_root(tmp_path):
    a = syn.write_scenes(
        tmp_path / "a", kind="cityscapes", num_train=2, num_val=1, height=H, width=W, seed=4
    )
    b = syn.write_scenes(
        tmp_path / "b", kind="cityscapes", num_train=2, num_val=1, height=H, width=W, seed=4
    )
    for name in listing(a):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    syn.write_scenes(tmp_path / "empty", num_train=1, num_val=1, height=H, width=W)
    with pytest.raises(ValueError) as info:
        syn.write_scenes(a, kind="cityscapes", num_train=2, num_val=1, height=H, width=W, seed=4)
    assert str(a) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        syn.write_scenes(tmp_path / "c", kind="kitti")
    with pytest.raises(ValueError):
        syn.write_scenes(tmp_path / "c", num_train=0)
    assert not (tmp_path / "c").exists()


def test_synthetic_root_is_cached(tmp_path, monkeypatch):
    kwargs = dict(num_train=2, num_val=1, height=H, width=W, seed=3, cache_dir=tmp_path)
    root = syn.synthetic_root("nyuv2", **kwargs)
    assert root.parent == tmp_path and f"v{syn.GENERATOR_VERSION}" in root.name
    assert "nyuv2" in root.name and f"{H}x{W}" in root.name and "seed3" in root.name
    mtime = (root / "train" / "image" / "1.npy").stat().st_mtime_ns

    def fail(*args, **kw):
        raise AssertionError("regenerated")

    monkeypatch.setattr(syn, "render_example", fail)
    assert syn.synthetic_root("nyuv2", **kwargs) == root
    assert (root / "train" / "image" / "1.npy").stat().st_mtime_ns == mtime
    assert syn.synthetic_root("nyuv2", **{**kwargs, "seed": 3}) == root
    with pytest.raises(AssertionError):  # another seed is another folder
        syn.synthetic_root("nyuv2", **{**kwargs, "seed": 4})
    assert sorted(os.listdir(tmp_path)) == [root.name]  # the failed attempt left nothing


def test_synthetic_root_race_loser_discards_its_copy(tmp_path, monkeypatch):
    kwargs = dict(num_train=1, num_val=1, height=H, width=W, seed=0, cache_dir=tmp_path)
    original = syn.render_example
    name = f"cityscapes_{H}x{W}_train1_val1_seed0_v{syn.GENERATOR_VERSION}"
    calls = []

    def racing(*args, **kw):
        if not calls:  # another process finishes first, while this one is generating
            calls.append(1)
            monkeypatch.setattr(syn, "render_example", original)
            syn.write_scenes(
                tmp_path / name, kind="cityscapes", num_train=1, num_val=1, height=H, width=W
            )
            monkeypatch.setattr(syn, "render_example", racing)
        return original(*args, **kw)

    monkeypatch.setattr(syn, "render_example", racing)
    root = syn.synthetic_root("cityscapes", **kwargs)
    assert calls and root == tmp_path / name
    assert os.listdir(tmp_path) == [name]
    assert len(listing(root)) == 8


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        syn.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--kind", "--out", "--num_train", "--num_val", "--height", "--width", "--seed"):
        assert flag in text
    assert (
        syn.main(
            [
                "--kind",
                "cityscapes",
                "--out",
                str(tmp_path / "cs"),
                "--num_train",
                "2",
                "--num_val",
                "1",
                "--height",
                str(H),
                "--width",
                str(W),
                "--seed",
                "9",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "cs")
    assert len(listing(tmp_path / "cs")) == 12
    with pytest.raises(SystemExit) as info:  # a non-empty --out is refused with a one-line error
        syn.main(["--out", str(tmp_path / "cs"), "--height", str(H), "--width", str(W)])
    assert info.value.code == 2 and str(tmp_path / "cs") in capsys.readouterr().err
