"""The procedural world's primitives and its ray caster (``stablemtl.data.synthetic`` draws the scenes
and renders them).

Shapes (quads, boxes, spheres, capped cylinders) are placed by rigid poses at time 1 and
time 2 and carry a material: a solid procedural texture attached to the object (it moves
with it) and a Blinn-Phong gloss. ``cast`` finds the closest hit of every ray; ``blocked``
tests shadow rays. Camera frame: x right, y down, z forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-6  # hits nearer than this along a ray are ignored (a surface does not hit itself)


# --------------------------------------------------------------------------- geometry helpers

def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation about y (yaw), then x (pitch), then z (roll), camera axes."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


@dataclass
class Material:
    family: str
    color_a: np.ndarray
    color_b: np.ndarray
    scale: float
    seed: int
    gloss: float = 0.0  # Blinn-Phong specular strength; 0 = Lambertian


@dataclass
class Primitive:
    shape: str  # quad (local y = 0, |x|<=a, |z|<=c), box (|p|<=size), sphere (radius), cylinder (axis y)
    size: tuple
    rotation: np.ndarray  # local -> world at time 1
    position: np.ndarray
    semantic: int
    material: Material
    motion: tuple = (np.eye(3), np.zeros(3))  # world-frame rigid motion from time 1 to time 2

    def pose(self, time: int) -> tuple[np.ndarray, np.ndarray]:
        if time == 1:
            return self.rotation, self.position
        rm, tm = self.motion
        return rm @ self.rotation, rm @ self.position + tm


@dataclass
class Light:
    direction: np.ndarray | None  # unit vector from surface to light (directional) ...
    position: np.ndarray | None  # ... or a point light
    color: np.ndarray
    intensity: float


@dataclass
class Scene:
    kind: str
    domain: str
    objects: list
    lights: list
    ambient: np.ndarray
    sky: tuple  # (horizon colour, zenith colour), or None where every ray hits
    focal: float  # fx = fy = focal * width
    principal: tuple  # (cx, cy) offsets as fractions of (width, height) from the centre
    cam2_rotation: np.ndarray  # camera 2 -> world
    cam2_position: np.ndarray
    sensor: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- ray casting

def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-12, np.where(d < 0, -1e-12, 1e-12), d)


def _hit_quad(o, d, size):
    a, c = size
    dy = _safe(d[:, 1])
    t = -o[:, 1] / dy
    p = o + t[:, None] * d
    ok = (t > EPS) & (np.abs(p[:, 0]) <= a) & (np.abs(p[:, 2]) <= c)
    n = np.zeros_like(o)
    n[:, 1] = -np.sign(dy)
    return np.where(ok, t, np.inf), n


def _hit_box(o, d, size):
    h = np.asarray(size, dtype=np.float64)
    ds = _safe(d)
    t1, t2 = (-h - o) / ds, (h - o) / ds
    tnear, tfar = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in, t_out = tnear.max(axis=1), tfar.min(axis=1)
    inside = t_in <= EPS  # the ray starts inside the box (rooms): the hit is the exit face
    t = np.where(inside, t_out, t_in)
    axis = np.where(inside, tfar.argmin(axis=1), tnear.argmax(axis=1))
    ok = (t_out >= t_in) & (t > EPS)
    n = np.zeros_like(o)
    rows = np.arange(len(o))
    n[rows, axis] = -np.sign(ds[rows, axis])  # entering or leaving, the face looks back along the ray
    return np.where(ok, t, np.inf), n


def _hit_sphere(o, d, size):
    (r,) = size
    a = (d * d).sum(1)
    b = (o * d).sum(1)
    c = (o * o).sum(1) - r * r
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    t0, t1 = (-b - sq) / a, (-b + sq) / a
    t = np.where(t0 > EPS, t0, t1)
    ok = (disc >= 0) & (t > EPS)
    n = (o + t[:, None] * d) / r
    return np.where(ok, t, np.inf), n


def _hit_cylinder(o, d, size):
    r, hh = size
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - r * r
    a_safe = np.maximum(a, 1e-12)
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    best = np.full(len(o), np.inf)
    n = np.zeros_like(o)
    for t in ((-b - sq) / a_safe, (-b + sq) / a_safe):
        y = o[:, 1] + t * d[:, 1]
        ok = (disc >= 0) & (a > 1e-12) & (t > EPS) & (np.abs(y) <= hh) & (t < best)
        best = np.where(ok, t, best)
        p = o + t[:, None] * d
        side = np.stack([p[:, 0] / r, np.zeros(len(o)), p[:, 2] / r], 1)
        n = np.where(ok[:, None], side, n)
    dy = _safe(d[:, 1])
    for cap in (-hh, hh):
        t = (cap - o[:, 1]) / dy
        p = o + t[:, None] * d
        ok = (t > EPS) & (p[:, 0] ** 2 + p[:, 2] ** 2 <= r * r) & (t < best)
        best = np.where(ok, t, best)
        n = np.where(ok[:, None], np.array([0.0, np.sign(cap), 0.0]), n)
    return best, n


_HIT = {"quad": _hit_quad, "box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


@dataclass
class Hits:
    t: np.ndarray  # ray parameter (rays have unit z in their camera, so t is not metric)
    index: np.ndarray  # object index, -1 where the ray escapes
    local: np.ndarray  # hit point in the object's frame
    normal: np.ndarray  # world-frame unit normal facing the ray origin


def _bounding_radius(obj: Primitive) -> float:
    size = np.asarray(obj.size, dtype=np.float64)
    if obj.shape == "sphere":
        return float(size[0])
    return float(np.linalg.norm(size)) * 1.0001


def cast(objects, origins: np.ndarray, dirs: np.ndarray, time: int) -> Hits:
    """Closest hit of every ray ``origin + t * dir`` among ``objects`` posed at ``time``.

    Rays are first tested against each object's bounding sphere, so small
    objects (poles, signs) only cost the rays that pass near them.
    """
    n_rays = len(dirs)
    origins = np.broadcast_to(origins, dirs.shape)
    best = Hits(np.full(n_rays, np.inf), np.full(n_rays, -1), np.zeros((n_rays, 3)), np.zeros((n_rays, 3)))
    dd = (dirs * dirs).sum(1)
    for k, obj in enumerate(objects):
        rot, pos = obj.pose(time)
        radius = _bounding_radius(obj)
        oc = pos - origins
        along = (oc * dirs).sum(1) / dd  # ray parameter of the closest approach to the centre
        miss = (oc * oc).sum(1) - along**2 * dd
        near = (miss <= radius**2) & ((along > 0) | ((oc * oc).sum(1) <= radius**2))
        idx = np.nonzero(near)[0]
        if idx.size == 0:
            continue
        o_local = (origins[idx] - pos) @ rot  # R^T (o - p), row vectors
        d_local = dirs[idx] @ rot
        t, n_local = _HIT[obj.shape](o_local, d_local, obj.size)
        closer = t < best.t[idx]
        if not closer.any():
            continue
        sel = idx[closer]
        best.t[sel] = t[closer]
        best.index[sel] = k
        best.local[sel] = o_local[closer] + t[closer, None] * d_local[closer]
        best.normal[sel] = n_local[closer] @ rot.T
    norm = np.linalg.norm(best.normal, axis=1, keepdims=True)
    best.normal = np.where(norm > 0, best.normal / np.maximum(norm, 1e-12), 0.0)
    facing = (best.normal * dirs).sum(1) > 0
    best.normal[facing] *= -1
    return best


def blocked(objects, points: np.ndarray, to_light: np.ndarray, distance: np.ndarray, time: int) -> np.ndarray:
    """True where a segment from ``points`` towards the light hits something before ``distance``."""
    start = points + 1e-4 * to_light
    hits = cast(objects, start, to_light, time)
    return hits.t < distance - 1e-4


# --------------------------------------------------------------------------- textures

def _hash3(ix, iy, iz, seed: int) -> np.ndarray:
    h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791) ^ (seed * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65535.0


def value_noise(p: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 3-D value noise in [0, 1] (trilinear with smoothstep weights)."""
    f = np.floor(p)
    w = p - f
    w = w * w * (3 - 2 * w)
    i = f.astype(np.int64)
    out = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = (w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1]) * (w[:, 2] if dz else 1 - w[:, 2])
                out = out + weight * _hash3(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def _fbm(p, seed, octaves=3):
    total, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        total = total + amp * value_noise(p * 2**o, seed + o)
        norm += amp
        amp *= 0.5
    return total / norm


def _soft(x, sharpness=6.0):
    return 0.5 + 0.5 * np.tanh(sharpness * x)


def texture(material: Material, local: np.ndarray) -> np.ndarray:
    """Albedo of a solid texture at object-local points, in [0.02, 0.95]."""
    p = local / material.scale
    fam = material.family
    if fam == "checker":  # smooth-edged 3-D checker
        mix = _soft(np.sin(np.pi * p[:, 0]) * np.sin(np.pi * p[:, 1]) * np.sin(np.pi * p[:, 2]) * 4)
    elif fam == "stripes":
        mix = _soft(np.sin(np.pi * (p[:, 0] + p[:, 1] + 0.5 * p[:, 2])))
    elif fam == "noise":
        mix = _fbm(p, material.seed, 2)
    elif fam == "flat":
        mix = 0.15 * value_noise(p, material.seed)
    elif fam == "marble":
        mix = 0.5 + 0.5 * np.sin(2.0 * p[:, 0] + 5.0 * _fbm(p, material.seed, 3))
    elif fam == "bricks":
        row = np.floor(p[:, 1] * 2)
        shifted = p[:, 0] + p[:, 2] + 0.5 * (row % 2)
        mortar = np.minimum(_soft(np.sin(np.pi * 2 * p[:, 1]) ** 2 - 0.05, 20), _soft(np.sin(np.pi * shifted) ** 2 - 0.05, 20))
        mix = 1 - mortar + 0.2 * value_noise(p * 3, material.seed)
    elif fam == "wood":
        r = np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) * 3 + 2 * _fbm(p, material.seed, 2)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * r)
    elif fam == "grain":
        mix = 0.6 * _fbm(p * 2, material.seed, 2) + 0.4 * value_noise(p, material.seed + 7)
    else:
        raise ValueError(f"unknown texture family {fam!r}")
    mix = np.clip(mix, 0, 1)[:, None]
    return np.clip(material.color_a * (1 - mix) + material.color_b * mix, 0.02, 0.95)


TEXTURE_FAMILIES = {"train": ("checker", "stripes", "noise", "flat"), "real": ("marble", "bricks", "wood", "grain")}
