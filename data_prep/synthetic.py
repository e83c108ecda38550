"""Procedural outdoor road scenes from a car-mounted camera (the embedded default data set).

``python -m data_prep.synthetic --out DIR --frames N [--seed S] [--width W --height H]``

Each frame is ray cast in numpy: a ground plane (road, lane markings, sidewalks, grass and
dirt), axis-aligned boxes for buildings, vehicles and poles, spheres for tree crowns, far
silhouettes for hills (about 120-450 m) and mountains (about 460-630 m), and sky beyond them. The
camera sits about 1.65 m above the road with KITTI-like intrinsics scaled to the output width,
a random pitch, roll and yaw. Depth is planar z (along the optical axis) in centimetres
(depth_scale 0.01, as in Virtual KITTI 2): all geometry stays below 655 m, and the sky is
65535 (beyond range) with sky.png.

Depth cues in the image: perspective, occlusion, Lambert shading with a random sun, cast
shadows on the ground, textures defined in world coordinates (so they get denser with
distance) and haze that grows with distance. Layouts (urban, suburban, rural), colours, sun,
haze, sky and camera pose vary per frame.

Frame ``i`` of seed ``s`` uses ``np.random.default_rng([s, i])``: frames do not depend on the
number of workers, and two seeds never share a frame stream. Train and validation use
disjoint seeds (the Makefile: ``--seed 0`` for train, ``--seed 1000000`` for validation).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from . import convert
from .arguments import ArgumentParser
from .schema import depth_to_raw, encode_sample, make_key

SOURCE = "synthetic"
DEPTH_SCALE = 0.01
MAX_FINITE_M = 650.0
KITTI_FX, KITTI_CX, KITTI_CY, KITTI_W, KITTI_H = 721.5377, 609.5593, 172.854, 1242, 375
DEFAULT_W, DEFAULT_H = 420, 140
MAX_SIDE = 8192  # a frame of 8192 x 8192 is 64 Mpixel: larger is a typo, not a data set
LAYOUTS = ("urban", "suburban", "rural")

# object kinds
K_BUILDING, K_VEH_BODY, K_VEH_CABIN, K_POLE, K_TRUNK, K_CROWN = range(6)
# ids below the object range
ID_SKY, ID_GROUND = -1, 0


# -- noise -----------------------------------------------------------------------------------


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    # uint32 arithmetic wraps modulo 2**32, which is what the hash wants
    h = ix.astype(np.uint32) * np.uint32(374761393)
    h += iy.astype(np.uint32) * np.uint32(668265263)
    h += np.uint32((seed * 1442695041) & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h *= np.uint32(1274126177)
    h ^= h >> np.uint32(16)
    return (h & np.uint32(0xFFFF)).astype(np.float32) * np.float32(1.0 / 65535.0)


def value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1], defined on a unit lattice."""
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    ix = x0.astype(np.int64)
    iy = y0.astype(np.int64)
    sx = fx * fx * (3 - 2 * fx)
    sy = fy * fy * (3 - 2 * fy)
    a = _hash(ix, iy, seed)
    b = _hash(ix + 1, iy, seed)
    c = _hash(ix, iy + 1, seed)
    d = _hash(ix + 1, iy + 1, seed)
    top = a + (b - a) * sx
    bot = c + (d - c) * sx
    return top + (bot - top) * sy


def fbm(x, y, seed: int, freq: float, octaves: int, footprint=None, gain: float = 0.5) -> np.ndarray:
    """Fractal noise in about [0, 1]; octaves finer than the pixel footprint fade to their mean.

    The fading is a cheap stand-in for mip-mapping: far surfaces get smoother, not noisier.
    """
    total = np.zeros(np.shape(x), np.float32)
    norm = 0.0
    amp = 1.0
    f = freq
    for o in range(octaves):
        n = value_noise(x * f, y * f, seed + 7919 * o)
        if footprint is not None:
            w = np.clip(1.5 - 2.0 * footprint * f, 0.0, 1.0).astype(np.float32)
            n = 0.5 + (n - 0.5) * w
        total += amp * n
        norm += amp
        amp *= gain
        f *= 2.0
    return total / np.float32(norm)


def _aa_band(coord, lo, hi, footprint):
    """Coverage in [0, 1] of the periodic band frac(coord) in [lo, hi], blurred by footprint.

    Beyond the pixel footprint the pattern blends to its mean coverage (hi - lo).
    """
    fr = coord - np.floor(coord)
    inside = ((fr >= lo) & (fr <= hi)).astype(np.float32)
    w = np.clip(1.5 - 2.0 * footprint, 0.0, 1.0).astype(np.float32)
    return inside * w + np.float32(hi - lo) * (1 - w)


# -- scene description -----------------------------------------------------------------------


@dataclass
class Scene:
    layout: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    origin: np.ndarray  # camera centre in world (x right, y up, z along the road)
    rot: np.ndarray  # camera (x right, y up, z forward) -> world
    road_half: float
    sidewalk: float
    lane_width: float
    n_lanes: int
    boxes: np.ndarray  # (N, 6) xmin ymin zmin xmax ymax zmax
    box_obj: np.ndarray  # (N,) object id
    spheres: np.ndarray  # (M, 4) cx cy cz r
    sphere_obj: np.ndarray
    kind: np.ndarray  # per object id (index 0 unused)
    colour: np.ndarray  # (n_obj, 3)
    param: np.ndarray  # (n_obj, 4) kind-specific (building: floor h, window spacing, window frac, style)
    layers: list  # silhouettes: dicts with r0, k, height-profile params, colour
    sun: np.ndarray
    sun_int: float
    sun_col: np.ndarray
    ambient: float
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    haze_col: np.ndarray
    haze_beta: float
    clouds: float
    ground_cols: dict
    noise_seed: int
    exposure: float
    sensor_noise: float


def _rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return ry @ rx @ rz


_FACADES = np.array([
    [0.62, 0.60, 0.56], [0.70, 0.66, 0.58], [0.55, 0.33, 0.26], [0.78, 0.76, 0.72],
    [0.45, 0.44, 0.45], [0.66, 0.55, 0.42], [0.58, 0.62, 0.66], [0.80, 0.72, 0.60],
])
_CARS = np.array([
    [0.85, 0.85, 0.86], [0.08, 0.08, 0.09], [0.55, 0.56, 0.58], [0.60, 0.08, 0.07],
    [0.10, 0.20, 0.50], [0.25, 0.35, 0.30], [0.80, 0.70, 0.20], [0.35, 0.35, 0.38],
])


def make_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    layout = LAYOUTS[rng.choice(3, p=[0.3, 0.4, 0.3])]
    fx = KITTI_FX * width / KITTI_W
    cx = KITTI_CX * width / KITTI_W
    cy = KITTI_CY * height / KITTI_H

    n_lanes = int(rng.choice([2, 2, 3, 4]))
    lane_w = rng.uniform(3.0, 3.8)
    road_half = n_lanes * lane_w / 2
    sidewalk = rng.uniform(1.5, 4.0) if layout == "urban" else (rng.uniform(1.0, 2.5) if rng.random() < 0.4 else 0.0)
    lane = int(rng.integers(n_lanes // 2, n_lanes)) if n_lanes > 1 else 0  # right-hand traffic
    cam_x = -road_half + (lane + 0.5) * lane_w + rng.normal(0, 0.3)
    cam_h = rng.uniform(1.55, 1.75)
    origin = np.array([cam_x, cam_h, 0.0])
    yaw = math.radians(rng.uniform(-12, 12))
    pitch = math.radians(float(np.clip(rng.normal(0.0, 1.6), -4.5, 4.5)))
    roll = math.radians(float(np.clip(rng.normal(0.0, 0.8), -2.5, 2.5)))

    boxes: list[list[float]] = []
    box_obj: list[int] = []
    spheres: list[list[float]] = []
    sphere_obj: list[int] = []
    kind = [-1]
    colour = [np.zeros(3)]
    param = [np.zeros(4)]

    def new_obj(k: int, col, prm=(0, 0, 0, 0)) -> int:
        kind.append(k)
        colour.append(np.asarray(col, float))
        param.append(np.asarray(prm, float))
        return len(kind) - 1

    def add_box(k, col, lo, hi, prm=(0, 0, 0, 0), obj=None):
        if obj is None:
            obj = new_obj(k, col, prm)
        boxes.append([lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]])
        box_obj.append(obj)
        return obj

    edge = road_half + sidewalk
    # buildings along both sides of the road
    if layout == "urban":
        zmax, gap, setback, height_rng, depth_rng = rng.uniform(200, 480), (0, 18), (1, 8), (6, 24), (10, 25)
    elif layout == "suburban":
        zmax, gap, setback, height_rng, depth_rng = rng.uniform(150, 320), (5, 25), (5, 18), (4, 11), (8, 14)
    else:
        zmax, gap, setback, height_rng, depth_rng = rng.uniform(100, 400), (30, 140), (10, 60), (3, 9), (6, 14)
    for side in (-1, 1):
        if layout != "urban" and rng.random() < 0.25:
            continue  # open land on this side
        z = rng.uniform(-15, 10)
        while z < zmax:
            length = rng.uniform(8, 30)
            d = rng.uniform(*depth_rng)
            s = edge + rng.uniform(*setback)
            hgt = rng.uniform(*height_rng) * (1.5 if rng.random() < 0.1 else 1.0)
            x0, x1 = (s, s + d) if side > 0 else (-s - d, -s)
            col = _FACADES[rng.integers(len(_FACADES))] * rng.uniform(0.8, 1.15)
            prm = (rng.uniform(2.8, 3.6), rng.uniform(1.8, 4.0), rng.uniform(0.3, 0.7), rng.integers(3))
            add_box(K_BUILDING, np.clip(col, 0, 1), (x0, 0, z), (x1, hgt, z + length), prm)
            z += length + rng.uniform(*gap)
    # distant buildings / skyline beyond 80 m (so the far range has structure, not only sky)
    n_far = {"urban": rng.integers(8, 25), "suburban": rng.integers(2, 12), "rural": rng.integers(0, 5)}[layout]
    for _ in range(int(n_far)):
        z = rng.uniform(120, 400)
        x = rng.uniform(-1, 1) * z * 0.7
        if abs(x) < edge + 8:
            x = math.copysign(edge + 8 + abs(x), x if x else 1.0)
        w, d = rng.uniform(12, 45), rng.uniform(12, 45)
        hgt = rng.uniform(15, 90) if layout == "urban" else rng.uniform(6, 25)
        col = _FACADES[rng.integers(len(_FACADES))] * rng.uniform(0.8, 1.15)
        prm = (rng.uniform(2.8, 3.6), rng.uniform(1.8, 4.0), rng.uniform(0.3, 0.7), rng.integers(3))
        add_box(K_BUILDING, np.clip(col, 0, 1), (x - w / 2, 0, z), (x + w / 2, hgt, z + d), prm)

    # vehicles (3-80 m): in lanes and parked at the kerb
    n_veh = int(rng.integers(0, 9 if layout != "rural" else 4))
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(n_veh):
        parked = rng.random() < (0.4 if layout != "rural" else 0.1)
        truck = rng.random() < 0.12
        w = rng.uniform(2.3, 2.6) if truck else rng.uniform(1.65, 1.95)
        length = rng.uniform(6, 10) if truck else rng.uniform(3.8, 4.9)
        if parked:
            xc = math.copysign(road_half - w / 2 - 0.2, rng.uniform(-1, 1))
        else:
            xc = -road_half + (rng.integers(n_lanes) + 0.5) * lane_w + rng.normal(0, 0.25)
        z0 = rng.uniform(3, 80)
        if abs(xc - cam_x) < (w / 2 + 1.2) and z0 < 5:
            z0 += 5  # not on top of the camera
        fp = (xc - w / 2, xc + w / 2, z0, z0 + length)
        if any(not (fp[1] < p[0] - 0.3 or fp[0] > p[1] + 0.3 or fp[3] < p[2] - 0.5 or fp[2] > p[3] + 0.5) for p in placed):
            continue
        placed.append(fp)
        col = np.clip(_CARS[rng.integers(len(_CARS))] * rng.uniform(0.85, 1.1), 0, 1)
        if truck:
            hb = rng.uniform(2.8, 3.6)
            add_box(K_VEH_BODY, col, (fp[0], 0.35, fp[2] + 2.0), (fp[1], hb, fp[3]))
            add_box(K_VEH_BODY, col * 0.9, (fp[0], 0.35, fp[2]), (fp[1], 2.5, fp[2] + 1.9))
        else:
            hb = rng.uniform(0.9, 1.05)
            add_box(K_VEH_BODY, col, (fp[0], 0.2, fp[2]), (fp[1], hb, fp[3]))
            inset = rng.uniform(0.8, 1.2)
            add_box(K_VEH_CABIN, col, (fp[0] + 0.12, hb, fp[2] + inset), (fp[1] - 0.12, hb + rng.uniform(0.4, 0.55), fp[3] - inset * 0.8))

    # poles: street lights / utility poles at the road edges, 3-150 m
    spacing = rng.uniform(20, 45)
    pole_col = np.array([0.45, 0.45, 0.47]) if layout != "rural" else np.array([0.40, 0.30, 0.20])
    for side in (-1, 1):
        if rng.random() < 0.35:
            continue
        z = rng.uniform(3, spacing)
        px = side * (edge + rng.uniform(0.3, 1.5))
        r = rng.uniform(0.1, 0.16)
        ph = rng.uniform(5, 9)
        while z < 150:
            obj = add_box(K_POLE, pole_col, (px - r, 0, z - r), (px + r, ph, z + r))
            if layout != "rural":  # lamp arm over the road
                add_box(K_POLE, pole_col, (min(px, px - side * 1.8), ph - 0.15, z - 0.08),
                        (max(px, px - side * 1.8), ph, z + 0.08), obj=obj)
            z += spacing * rng.uniform(0.9, 1.1)

    # trees
    n_trees = {"urban": rng.integers(0, 10), "suburban": rng.integers(8, 30), "rural": rng.integers(10, 45)}[layout]
    for _ in range(int(n_trees)):
        z = rng.uniform(4, 220)
        lateral = edge + rng.uniform(1.5, 12 if layout != "rural" else 80)
        x = math.copysign(lateral, rng.uniform(-1, 1))
        trunk_h = rng.uniform(1.5, 3.5)
        cr = rng.uniform(1.3, 3.8)
        tr = rng.uniform(0.12, 0.25)
        add_box(K_TRUNK, np.array([0.30, 0.22, 0.15]) * rng.uniform(0.8, 1.2), (x - tr, 0, z - tr), (x + tr, trunk_h + cr * 0.5, z + tr))
        g = np.array([rng.uniform(0.12, 0.30), rng.uniform(0.28, 0.45), rng.uniform(0.08, 0.18)])
        obj = new_obj(K_CROWN, g)
        spheres.append([x, trunk_h + cr * 0.9, z, cr])
        sphere_obj.append(obj)

    # silhouettes: hills (with gaps, about 120-450 m) and mountains (all round, about 460-630 m)
    layers = []
    if rng.random() < 0.85:
        r0 = rng.uniform(120, 350)
        layers.append(dict(
            r0=r0, dr=rng.uniform(0, 40), k=rng.uniform(1.5, 4.0), base=rng.uniform(-15, 10),
            amp=rng.uniform(15, 50), freqs=rng.uniform(1.5, 9, 4), phases=rng.uniform(0, 2 * np.pi, 4),
            col=np.array([rng.uniform(0.15, 0.35), rng.uniform(0.28, 0.45), rng.uniform(0.12, 0.25)]),
            seed=int(rng.integers(1 << 20)), snow=1e9, min_top=-1.0,
        ))
    mtn_amp = {"urban": rng.uniform(15, 60), "suburban": rng.uniform(25, 90), "rural": rng.uniform(30, 110)}[layout]
    rock = rng.uniform(0, 1)
    layers.append(dict(
        r0=rng.uniform(460, 505), dr=rng.uniform(0, 20), k=rng.uniform(0.3, 0.7), base=rng.uniform(4, 15),
        amp=mtn_amp, freqs=rng.uniform(2, 14, 4), phases=rng.uniform(0, 2 * np.pi, 4),
        col=np.array([0.20, 0.30, 0.18]) * (1 - rock) + np.array([0.42, 0.40, 0.38]) * rock,
        seed=int(rng.integers(1 << 20)), snow=rng.uniform(45, 120),
        min_top=3.0,  # taller than the camera: the ground never shows beyond the mountains
    ))

    # lighting and atmosphere
    weather = rng.choice(["clear", "hazy", "overcast", "golden"], p=[0.4, 0.25, 0.2, 0.15])
    sun_el = math.radians(rng.uniform(8, 20) if weather == "golden" else rng.uniform(20, 70))
    sun_az = rng.uniform(-math.pi, math.pi)
    sun = np.array([math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el), math.cos(sun_el) * math.cos(sun_az)])
    if weather == "clear":
        zen, hor = np.array([0.25, 0.45, 0.85]), np.array([0.70, 0.80, 0.92])
        sun_int, ambient, beta = rng.uniform(0.75, 0.95), rng.uniform(0.30, 0.42), 1 / rng.uniform(1500, 5000)
        sun_col = np.array([1.0, 0.98, 0.94])
    elif weather == "hazy":
        zen, hor = np.array([0.45, 0.58, 0.80]), np.array([0.80, 0.83, 0.86])
        sun_int, ambient, beta = rng.uniform(0.55, 0.80), rng.uniform(0.38, 0.50), 1 / rng.uniform(350, 1200)
        sun_col = np.array([1.0, 0.97, 0.90])
    elif weather == "overcast":
        g = rng.uniform(0.55, 0.8)
        zen, hor = np.array([g, g, g + 0.03]) * 0.9, np.array([g, g, g]) + 0.12
        sun_int, ambient, beta = rng.uniform(0.10, 0.30), rng.uniform(0.55, 0.70), 1 / rng.uniform(500, 2500)
        sun_col = np.array([1.0, 1.0, 1.0])
    else:
        zen, hor = np.array([0.30, 0.40, 0.70]), np.array([0.95, 0.72, 0.50])
        sun_int, ambient, beta = rng.uniform(0.7, 0.9), rng.uniform(0.28, 0.40), 1 / rng.uniform(800, 3000)
        sun_col = np.array([1.0, 0.80, 0.60])
    jitter = rng.uniform(0.92, 1.08, 3)
    zen = np.clip(zen * jitter, 0, 1)
    hor = np.clip(hor * jitter, 0, 1)

    ground_cols = {
        "asphalt": np.array([0.30, 0.30, 0.31]) * rng.uniform(0.75, 1.3),
        "marking": np.array([0.88, 0.88, 0.85]) if rng.random() < 0.85 else np.array([0.90, 0.78, 0.25]),
        "sidewalk": np.array([0.60, 0.58, 0.55]) * rng.uniform(0.85, 1.15),
        "grass": np.array([rng.uniform(0.18, 0.40), rng.uniform(0.32, 0.48), rng.uniform(0.10, 0.20)]),
        "dirt": np.array([0.48, 0.40, 0.30]) * rng.uniform(0.8, 1.2),
        "markings": float(rng.random() < 0.85),
    }

    kind_a = np.array(kind, np.int16)
    return Scene(
        layout=layout, width=width, height=height, fx=fx, fy=fx, cx=cx, cy=cy,
        origin=origin, rot=_rot(yaw, pitch, roll), road_half=road_half, sidewalk=sidewalk,
        lane_width=lane_w, n_lanes=n_lanes,
        boxes=np.array(boxes, float).reshape(-1, 6), box_obj=np.array(box_obj, np.int32),
        spheres=np.array(spheres, float).reshape(-1, 4), sphere_obj=np.array(sphere_obj, np.int32),
        kind=kind_a, colour=np.array(colour, np.float32), param=np.array(param, np.float32),
        layers=layers, sun=sun, sun_int=float(sun_int), sun_col=sun_col, ambient=float(ambient),
        sky_zenith=zen, sky_horizon=hor, haze_col=hor * 0.97 + 0.03,
        haze_beta=float(beta), clouds=float(rng.uniform(0, 0.7) if weather != "overcast" else 0.0),
        ground_cols=ground_cols, noise_seed=int(rng.integers(1 << 20)),
        exposure=float(rng.uniform(0.9, 1.12)), sensor_noise=float(rng.uniform(0.004, 0.015)),
    )


# -- ray casting -----------------------------------------------------------------------------


def _silhouette_height(layer: dict, az: np.ndarray) -> np.ndarray:
    h = np.zeros_like(az)
    for i, (f, p) in enumerate(zip(layer["freqs"], layer["phases"])):
        h += np.sin(az * f + p) / (1.0 + 0.6 * i)
    h = 0.5 + 0.5 * h / 2.2  # roughly [0, 1]
    ridge = value_noise(az * 40.0, np.zeros_like(az), layer["seed"]) - 0.5
    return layer["base"] + layer["amp"] * h + 0.08 * layer["amp"] * ridge


class _Buffers:
    def __init__(self, h: int, w: int):
        self.t = np.full((h, w), np.inf)
        self.obj = np.full((h, w), ID_SKY, np.int32)
        self.face = np.zeros((h, w), np.int8)  # box face code 0..5 (axis * 2 + positive side)


_CORNER_SEL = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], bool)


def _project_rects(sc: Scene, lo: np.ndarray, hi: np.ndarray) -> list:
    """Screen rectangles (v0, v1, u0, u1) covering world AABBs (N, 3), None where not visible."""
    if len(lo) == 0:
        return []
    corners = np.where(_CORNER_SEL[None], hi[:, None, :], lo[:, None, :])  # (N, 8, 3)
    pc = (corners - sc.origin) @ sc.rot  # world -> camera (x right, y up, z forward)
    z = pc[..., 2]
    behind = z <= 0.05
    zs = np.where(behind, 1.0, z)
    u = sc.cx + sc.fx * pc[..., 0] / zs
    v = sc.cy - sc.fy * pc[..., 1] / zs
    u0 = np.clip(np.floor(u.min(1)) - 1, 0, sc.width).astype(int)
    u1 = np.clip(np.ceil(u.max(1)) + 2, 0, sc.width).astype(int)
    v0 = np.clip(np.floor(v.min(1)) - 1, 0, sc.height).astype(int)
    v1 = np.clip(np.ceil(v.max(1)) + 2, 0, sc.height).astype(int)
    all_behind, some_behind = behind.all(1), behind.any(1)
    rects = []
    for i in range(len(lo)):
        if all_behind[i]:
            rects.append(None)
        elif some_behind[i]:  # straddles the camera plane: test the whole image
            rects.append((0, sc.height, 0, sc.width))
        elif u0[i] >= u1[i] or v0[i] >= v1[i]:
            rects.append(None)
        else:
            rects.append((v0[i], v1[i], u0[i], u1[i]))
    return rects


def cast(sc: Scene, dirs: np.ndarray) -> _Buffers:
    h, w = sc.height, sc.width
    o = sc.origin
    buf = _Buffers(h, w)

    # ground plane y = 0
    dy = dirs[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(dy < -1e-9, -o[1] / dy, np.inf)
    hit = np.isfinite(tg)
    buf.t[hit] = tg[hit]
    buf.obj[hit] = ID_GROUND

    # silhouettes: surfaces at horizontal distance r0(az) + k * y, up to a height profile
    s = np.hypot(dirs[..., 0], dirs[..., 2])
    az = np.arctan2(dirs[..., 0], dirs[..., 2])
    for li, layer in enumerate(sc.layers):
        r0 = layer["r0"] + layer["dr"] * np.sin(az * 3.0 + layer["phases"][0])
        den = s - layer["k"] * dy
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(den > 1e-6, (r0 + layer["k"] * o[1]) / den, np.inf)
        y = o[1] + t * dy
        cand = np.isfinite(t) & (y >= 0) & (y <= 140.0) & (t < buf.t)
        top = np.clip(_silhouette_height(layer, az[cand]), layer["min_top"], 140.0)
        m = np.zeros_like(cand)
        m[cand] = y[cand] <= top
        buf.t[m] = t[m]
        buf.obj[m] = -(10 + li)  # silhouettes: -10, -11, ...

    # boxes
    rects = _project_rects(sc, sc.boxes[:, :3], sc.boxes[:, 3:])
    for b, obj, rect in zip(sc.boxes, sc.box_obj, rects):
        lo, hi = b[:3], b[3:]
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        d = dirs[v0:v1, u0:u1]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
        t1 = (lo - o) * inv
        t2 = (hi - o) * inv
        tmin = np.minimum(t1, t2)
        tn = tmin.max(-1)
        tf = np.maximum(t1, t2).min(-1)
        tb = buf.t[v0:v1, u0:u1]
        m = (tn <= tf) & (tn > 0) & (tn < tb)
        if not m.any():
            continue
        axis = tmin.argmax(-1)
        positive = np.take_along_axis(d, axis[..., None], -1)[..., 0] < 0  # facing +axis
        tb[m] = tn[m]
        buf.obj[v0:v1, u0:u1][m] = obj
        buf.face[v0:v1, u0:u1][m] = (axis * 2 + positive)[m]

    # spheres
    rects = _project_rects(sc, sc.spheres[:, :3] - sc.spheres[:, 3:], sc.spheres[:, :3] + sc.spheres[:, 3:])
    for sp, obj, rect in zip(sc.spheres, sc.sphere_obj, rects):
        c, r = sp[:3], sp[3]
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        d = dirs[v0:v1, u0:u1]
        oc = o - c
        a = (d * d).sum(-1)
        bb = 2 * (d @ oc)
        cc = oc @ oc - r * r
        disc = bb * bb - 4 * a * cc
        with np.errstate(invalid="ignore"):
            t = (-bb - np.sqrt(disc)) / (2 * a)
        tb = buf.t[v0:v1, u0:u1]
        m = (disc > 0) & (t > 0) & (t < tb)
        tb[m] = t[m]
        buf.obj[v0:v1, u0:u1][m] = obj
    return buf


# -- shading ---------------------------------------------------------------------------------

_FACE_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], np.float32)


def _ground_shadow(sc: Scene, ground: np.ndarray, px: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """(H, W): 0 where a ground pixel lies in a cast shadow, 1 elsewhere.

    Each shadow is tested only inside the screen rectangle of its ground footprint.
    """
    lit = np.ones(ground.shape, np.float32)
    if sc.sun[1] <= 0.05:
        return lit
    ox, oz = -sc.sun[0] / sc.sun[1], -sc.sun[2] / sc.sun[1]  # ground offset per metre of height
    b = sc.boxes
    sx, sz = ox * b[:, 4], oz * b[:, 4]
    lo = np.stack([b[:, 0] + np.minimum(0, sx), np.zeros(len(b)), b[:, 2] + np.minimum(0, sz)], -1)
    hi = np.stack([b[:, 3] + np.maximum(0, sx), np.zeros(len(b)), b[:, 5] + np.maximum(0, sz)], -1)
    for i, rect in enumerate(_project_rects(sc, lo, hi)):
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        qx, qz = px[v0:v1, u0:u1], pz[v0:v1, u0:u1]
        near = ground[v0:v1, u0:u1] & (qx >= lo[i, 0]) & (qx <= hi[i, 0]) & (qz >= lo[i, 2]) & (qz <= hi[i, 2])
        if not near.any():
            continue
        qx, qz = qx[near], qz[near]
        # p - s * (sx, sz) inside the footprint for some s in [ymin / height, 1] (boxes may float)
        lo_s = np.full(qx.shape, b[i, 1] / b[i, 4])
        hi_s = np.ones(qx.shape)
        for q, a0, a1, off in ((qx, b[i, 0], b[i, 3], sx[i]), (qz, b[i, 2], b[i, 5], sz[i])):
            if abs(off) < 1e-9:
                hi_s = np.where((q >= a0) & (q <= a1), hi_s, -1.0)
            else:
                s1, s2 = (q - a1) / off, (q - a0) / off
                lo_s = np.maximum(lo_s, np.minimum(s1, s2))
                hi_s = np.minimum(hi_s, np.maximum(s1, s2))
        sub = lit[v0:v1, u0:u1]
        sub[near] = np.where(lo_s <= hi_s, 0.0, sub[near])
    sp = sc.spheres
    if len(sp):
        qx, qz = sp[:, 0] + ox * sp[:, 1], sp[:, 2] + oz * sp[:, 1]
        rad = sp[:, 3] * np.sqrt(1.0 + (ox * ox + oz * oz) * 0.5)
        lo = np.stack([qx - rad, np.zeros(len(sp)), qz - rad], -1)
        hi = np.stack([qx + rad, np.zeros(len(sp)), qz + rad], -1)
        for i, rect in enumerate(_project_rects(sc, lo, hi)):
            if rect is None:
                continue
            v0, v1, u0, u1 = rect
            inside = ground[v0:v1, u0:u1] & ((px[v0:v1, u0:u1] - qx[i]) ** 2 + (pz[v0:v1, u0:u1] - qz[i]) ** 2 < rad[i] ** 2)
            lit[v0:v1, u0:u1][inside] = 0.0
    return lit


def shade(sc: Scene, dirs: np.ndarray, buf: _Buffers, rng: np.random.Generator) -> np.ndarray:
    h, w = sc.height, sc.width
    ns = sc.noise_seed
    img = np.zeros((h, w, 3), np.float32)
    dirs32 = dirs.astype(np.float32)
    dnorm = np.sqrt((dirs32 * dirs32).sum(-1))
    dunit = dirs32 / dnorm[..., None]
    sky = buf.obj == ID_SKY
    solid = ~sky
    t = np.where(solid, buf.t, 0.0).astype(np.float32)
    p = sc.origin.astype(np.float32) + dirs32 * t[..., None]
    dist = t * dnorm
    albedo = np.zeros((h, w, 3), np.float32)
    normal = np.zeros((h, w, 3), np.float32)
    lit = np.ones((h, w), np.float32)
    ao = np.ones((h, w), np.float32)

    # ground
    g = buf.obj == ID_GROUND
    if g.any():
        gx, gz, gd = p[g, 0], p[g, 2], dist[g]
        cos_inc = np.maximum(-dunit[g, 1], 0.02)
        fp = gd / sc.fx / cos_inc  # metres per pixel on the ground
        gc = sc.ground_cols
        ax = np.abs(gx)
        n_fine = fbm(gx, gz, ns + 1, 2.0, 4, fp)
        n_coarse = fbm(gx, gz, ns + 2, 0.08, 3, fp)
        col = np.zeros((gx.size, 3), np.float32)
        road = ax <= sc.road_half
        side = (ax > sc.road_half) & (ax <= sc.road_half + sc.sidewalk)
        terr = ax > sc.road_half + sc.sidewalk
        col[road] = gc["asphalt"] * (0.8 + 0.4 * n_fine[road, None]) * (0.9 + 0.2 * n_coarse[road, None])
        if gc["markings"]:
            lw = 0.15
            mark = np.zeros(gx.shape, np.float32)
            half_px = fp / 2
            # edge lines and dashed lane separators, antialiased by their footprint coverage
            lines = [-sc.road_half + 0.3, sc.road_half - 0.3]
            for i in range(1, sc.n_lanes):
                lines.append(-sc.road_half + i * sc.lane_width)
            for i, lx in enumerate(lines):
                cov = np.clip((lw / 2 + half_px - np.abs(gx - lx)) / np.maximum(fp, lw), 0, 1)
                cov = np.minimum(cov, lw / np.maximum(fp, 1e-6))
                if i >= 2:
                    cov = cov * _aa_band(gz / 12.0, 0.0, 0.4, fp / 12.0)
                mark = np.maximum(mark, cov)
            mark *= road
            col = col * (1 - mark[:, None]) + gc["marking"] * mark[:, None]
        if side.any():
            tiles = _aa_band(gz[side] / 1.5, 0.04, 1.0, fp[side] / 1.5)
            col[side] = gc["sidewalk"] * (0.75 + 0.25 * tiles[:, None]) * (0.9 + 0.2 * n_fine[side, None])
        if terr.any():
            mix = np.clip((n_coarse[terr] - 0.35) * 3.0, 0, 1)[:, None]
            base = gc["grass"] * (1 - mix) + gc["dirt"] * mix
            col[terr] = base * (0.7 + 0.6 * n_fine[terr, None])
        albedo[g] = col
        normal[g] = (0, 1, 0)
        lit = _ground_shadow(sc, g & (dist < 250), p[..., 0], p[..., 2])
        # darker ground right under vehicles (ambient occlusion)
        aog = np.ones(gx.shape, np.float32)
        for b, obj in zip(sc.boxes, sc.box_obj):
            if sc.kind[obj] == K_VEH_BODY:
                under = (gx > b[0] - 0.15) & (gx < b[3] + 0.15) & (gz > b[2] - 0.15) & (gz < b[5] + 0.15)
                aog[under] = 0.35
        ao[g] = aog

    # silhouettes
    for li, layer in enumerate(sc.layers):
        m = buf.obj == -(10 + li)
        if not m.any():
            continue
        azm = np.arctan2(p[m, 0] - sc.origin[0], p[m, 2])
        y = p[m, 1]
        fp = dist[m] / sc.fx
        tex = fbm(azm * layer["r0"], y, layer["seed"], 0.05, 4, fp)
        col = layer["col"] * (0.6 + 0.8 * tex[:, None])
        snow = np.clip((y - layer["snow"]) / 8.0, 0, 1)[:, None] * (tex[:, None] > 0.35)
        col = col * (1 - snow) + np.array([0.92, 0.93, 0.95]) * snow
        albedo[m] = col
        horiz = -np.stack([np.sin(azm), np.zeros_like(azm), np.cos(azm)], -1)
        slope = np.cos(azm * 23.0 + tex * 6.0) * 0.6  # ridges catch the sun differently
        nrm = horiz + np.stack([np.cos(azm) * slope, np.full_like(azm, layer["k"]), -np.sin(azm) * slope], -1)
        normal[m] = nrm / np.linalg.norm(nrm, axis=-1, keepdims=True)

    # objects
    obj = np.where(buf.obj > 0, buf.obj, 0)
    kind = np.where(buf.obj > 0, sc.kind[obj], -1)
    is_box = (buf.obj > 0) & (kind != K_CROWN)
    if is_box.any():
        normal[is_box] = _FACE_NORMALS[buf.face[is_box]]
        albedo[is_box] = sc.colour[obj[is_box]]

    m = kind == K_BUILDING
    if m.any():
        face = buf.face[m]
        bx, by, bz = p[m, 0], p[m, 1], p[m, 2]
        u = np.where(face // 2 == 0, bz, bx)
        fp = dist[m] / sc.fx / np.maximum(np.abs((dunit[m] * _FACE_NORMALS[face]).sum(-1)), 0.05)
        prm = sc.param[obj[m]]
        floor_h, win_sp, win_frac, style = prm[:, 0], prm[:, 1], prm[:, 2], prm[:, 3]
        lo = (1 - win_frac) / 2
        wx = _aa_band(u / win_sp, lo, 1 - lo, fp / win_sp)
        wy = _aa_band(by / floor_h, 0.3, 0.3 + 0.45 * (0.8 + 0.2 * style / 2), fp / floor_h)
        win = wx * wy * (by > 1.0) * (face // 2 != 1)
        tex = fbm(u, by, ns + 3, 0.7, 3, fp)
        base = sc.colour[obj[m]] * (0.85 + 0.3 * tex[:, None])
        roof = face == 3
        base[roof] = base[roof] * 0.55
        glass = np.array([0.10, 0.13, 0.17]) + 0.15 * sc.sky_horizon * (0.5 + tex[:, None])
        albedo[m] = base * (1 - win[:, None]) + glass * win[:, None]

    m = kind == K_VEH_BODY
    if m.any():
        vy = p[m, 1]
        col = albedo[m]
        dark = (vy < 0.42)[:, None]
        albedo[m] = np.where(dark, np.array([0.05, 0.05, 0.05]), col)
    m = kind == K_VEH_CABIN
    if m.any():
        albedo[m] = np.array([0.06, 0.08, 0.10]) + 0.2 * sc.sky_horizon
    m = kind == K_TRUNK
    if m.any():
        albedo[m] = sc.colour[obj[m]] * (0.8 + 0.4 * value_noise(p[m, 1] * 3, p[m, 0] * 9 + p[m, 2] * 9, ns + 5)[:, None])
    m = kind == K_CROWN
    if m.any():
        idx = obj[m]
        sph_index = np.searchsorted(sc.sphere_obj, idx)
        c = sc.spheres[sph_index]
        nrm = (p[m] - c[:, :3]) / c[:, 3:4]
        fp = dist[m] / sc.fx
        leaves = fbm(p[m, 0] + p[m, 2], p[m, 1], ns + 6, 3.0, 3, fp)
        normal[m] = nrm
        albedo[m] = sc.colour[idx] * (0.55 + 0.9 * leaves[:, None])

    # lighting
    sun = sc.sun.astype(np.float32)
    ndl = np.clip(normal @ sun, 0, 1)
    light = (np.float32(sc.ambient) * ao * (0.75 + 0.25 * normal[..., 1]))[..., None] \
        + (np.float32(sc.sun_int) * ndl * lit)[..., None] * sc.sun_col.astype(np.float32)
    img = albedo * light  # the sky is filled in below

    # sky: gradient by elevation, sun glow and clouds
    if sky.any():
        el = np.clip(dunit[sky, 1], -0.2, 1.0)
        tsky = np.clip(el * 2.2, 0, 1) ** 0.7
        col = sc.sky_horizon * (1 - tsky[:, None]) + sc.sky_zenith * tsky[:, None]
        cosang = np.clip((dunit[sky] * sc.sun).sum(-1), -1, 1)
        col = col + (0.35 * sc.sun_int * np.exp((cosang - 1) * 40.0))[:, None] * sc.sun_col
        if sc.clouds > 0:
            e = np.maximum(dunit[sky, 1], 0.02)
            cxp, czp = dunit[sky, 0] / e, dunit[sky, 2] / e
            cl = fbm(cxp, czp, ns + 9, 0.6, 4, None)
            cover = np.clip((cl - (1 - sc.clouds)) * 3.0, 0, 1) * np.clip(el * 8, 0, 1)
            col = col * (1 - cover[:, None]) + (np.array([0.93, 0.93, 0.95]) * (0.75 + 0.25 * sc.sun_int)) * cover[:, None]
        img[sky] = col

    # haze grows with distance
    trans = np.exp(np.float32(-sc.haze_beta) * dist)[..., None]  # dist is 0 on the sky
    img = img * trans + sc.haze_col.astype(np.float32) * (1 - trans)

    img = img * sc.exposure + rng.normal(0, sc.sensor_noise, img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def ray_directions(sc: Scene) -> np.ndarray:
    """World ray per pixel scaled so that t along it is planar depth (unit camera z)."""
    u = (np.arange(sc.width) - sc.cx) / sc.fx
    v = (np.arange(sc.height) - sc.cy) / sc.fy
    d = np.empty((sc.height, sc.width, 3))
    d[..., 0] = u[None, :]
    d[..., 1] = -v[:, None]
    d[..., 2] = 1.0
    return d @ sc.rot.T


def render(seed: int, index: int, width: int = DEFAULT_W, height: int = DEFAULT_H) -> dict:
    """One frame: {"rgb" uint8 HxWx3, "depth" float64 planar metres (+inf = sky), "sky" bool,
    "fx", "fy", "cx", "cy", "layout"}; deterministic for (seed, index, width, height)."""
    rng = np.random.default_rng([seed, index])
    sc = make_scene(rng, width, height)
    dirs = ray_directions(sc)
    buf = cast(sc, dirs)
    rgb = shade(sc, dirs, buf, rng)
    depth = buf.t.copy()
    sky = buf.obj == ID_SKY
    depth[sky] = np.inf
    depth[~sky] = np.minimum(depth[~sky], MAX_FINITE_M)  # geometry is built below this; belt and braces
    return {"rgb": rgb, "depth": depth, "sky": sky, "fx": sc.fx, "fy": sc.fy, "cx": sc.cx, "cy": sc.cy,
            "layout": sc.layout}


# -- command line ----------------------------------------------------------------------------


def load(frame: convert.Frame, opts: dict) -> dict:
    q = frame.params
    r = render(q["seed"], q["index"], opts["width"], opts["height"])
    scene = f"seed{q['seed']}"
    frame_id = f"{q['index']:06d}"
    meta = {"source": SOURCE, "scene": scene, "frame": frame_id, "width": opts["width"],
            "height": opts["height"], "fx": r["fx"], "fy": r["fy"], "cx": r["cx"], "cy": r["cy"],
            "depth_scale": DEPTH_SCALE, "layout": r["layout"], "seed": q["seed"], "index": q["index"]}
    raw = depth_to_raw(r["depth"], DEPTH_SCALE, name=f"{scene}/{frame_id}")
    return encode_sample(make_key(SOURCE, scene, frame_id), r["rgb"], raw, meta, sky=r["sky"],
                         rgb_format=opts["rgb_format"], jpeg_quality=opts["jpeg_quality"])


def frames_for(seed: int, n: int) -> list[convert.Frame]:
    return [convert.Frame(label=f"seed{seed}/{i}", params={"seed": seed, "index": i}) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m data_prep.synthetic",
                        description="procedural outdoor road scenes -> shards")
    ap.add_argument("--frames", type=int, required=True, help="number of frames")
    ap.add_argument("--seed", type=int, default=0,
                    help="data set seed; use disjoint seeds for train and validation (default 0)")
    ap.add_argument("--width", type=int, default=DEFAULT_W)
    ap.add_argument("--height", type=int, default=DEFAULT_H)
    convert.add_output_args(ap, rgb_default="jpg", shard_size=32)
    args = ap.parse_args(argv)
    if args.frames < 1:
        return convert.fail(f"--frames must be >= 1, got {args.frames}")
    if args.seed < 0:
        return convert.fail(f"--seed must be >= 0, got {args.seed}")
    if not (16 <= args.width <= MAX_SIDE and 16 <= args.height <= MAX_SIDE):
        return convert.fail(f"--width and --height must lie in 16..{MAX_SIDE}, got {args.width}x{args.height}")
    opts = convert.common_opts(args) | {"width": args.width, "height": args.height}
    return convert.run("synthetic", frames_for(args.seed, args.frames), load, opts, args)


if __name__ == "__main__":
    sys.exit(main())
