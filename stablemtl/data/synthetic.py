"""The procedural world: a small physically consistent ray caster.

Every sample is a pure function of ``(kind, seed, domain)``: the scene (objects,
materials, lights, camera motion) is drawn from a generator seeded by those
alone, so the same scene renders at any resolution. A pinhole camera casts one
ray per pixel (pixel ``(row i, column j)`` is the ray through ``(u, v) = (j, i)``)
against primitives (quads, boxes, spheres, capped cylinders) placed by rigid
poses at time 1 and time 2; from the hits come

- geometry: planar depth z, camera-frame unit normals facing the camera,
  semantic classes (the release's 8; ignore where none fits);
- appearance: albedo from solid procedural textures attached to each object
  (they move with it), shading = ambient + Lambertian lights with cast shadows,
  RGB = albedo x shading, plus a Blinn-Phong highlight on glossy materials whose
  pixels are flagged non-Lambertian;
- motion: frame 2 is rendered from the moved camera with the moved objects;
  optical flow = projection of each surface point at time 2 minus its pixel;
  scene flow = X2 - X1 (camera-2 coordinates at time 2 minus camera-1
  coordinates at time 1, the KITTI-2015 convention); ``valid_flow`` marks points
  that land inside frame 2 and are not occluded there (a visibility ray from
  camera 2 must reach the very point).

Camera frame: x right, y down, z forward. World = camera 1 at time 1. The primitives,
their textures and the ray caster are ``stablemtl.data.raycast``; here: the scenes
(``make_scene``) and their rendering (``render_sample``).

Two domains: ``train`` looks synthetic-clean (saturated checker/stripe/noise
textures, white light, ideal sensor); ``real`` is the zero-shot stand-in (other
texture families and palettes, tinted light, other intrinsics, more glossy
materials, and a sensor: blur, white balance, gamma, vignetting and noise
applied to ``rgb`` only; ``rgb_linear`` keeps the image before the sensor).
"""

from __future__ import annotations

import zlib

import numpy as np

from stablemtl.data.raycast import (EPS, TEXTURE_FAMILIES, Hits, Light, Material, Primitive, Scene, blocked, cast,
                                    rotation, texture)
from stablemtl.metrics import IGNORE_INDEX

KINDS = ("indoor", "street", "flying")
DOMAINS = ("train", "real")

# Semantic ids of the release's 8 classes.
ROAD, BUILDING, POLE, LIGHT, SIGN, VEGETATION, SKY, VEHICLE = range(8)


# --------------------------------------------------------------------------- scene generation

_KIND_ID = {k: i for i, k in enumerate(KINDS)}
_DOMAIN_ID = {d: i for i, d in enumerate(DOMAINS)}


def _material(rng, domain: str, base: np.ndarray, spread: float = 0.25, gloss: float = 0.0, family=None) -> Material:
    """A material around ``base`` colour: train = saturated, real = muted and darker."""
    fam = family or rng.choice(TEXTURE_FAMILIES[domain])
    base = np.asarray(base, dtype=np.float64)
    if domain == "real":
        grey = base.mean()
        base = 0.55 * base + 0.45 * grey  # desaturate
        base = base * rng.uniform(0.7, 0.95)
    a = np.clip(base + rng.uniform(-spread, spread, 3) * 0.5, 0.05, 0.9)
    b = np.clip(base * rng.uniform(0.4, 1.3) + rng.uniform(-spread, spread, 3), 0.05, 0.9)
    scale = rng.uniform(0.4, 1.2) if domain == "train" else rng.uniform(0.25, 0.9)
    return Material(str(fam), a, b, float(scale), int(rng.integers(1 << 30)), gloss)


def _translation(t) -> tuple:
    return (np.eye(3), np.asarray(t, dtype=np.float64))


def _street(rng, domain: str) -> tuple[list, dict]:
    objs = []
    cam_h = rng.uniform(1.5, 1.7)
    add = lambda *a, **k: objs.append(Primitive(*a, **k))  # noqa: E731
    eye = np.eye(3)
    road_half = rng.uniform(3.5, 5.0)
    add("quad", (road_half, 45.0), eye, np.array([0, cam_h, 40.0]), ROAD, _material(rng, domain, [0.35, 0.33, 0.38], 0.1))
    for side in (-1, 1):  # sidewalks / terrain: ignore in the release's 8-class map
        add("quad", (4.0, 45.0), eye, np.array([side * (road_half + 4.0), cam_h - 0.12, 40.0]), IGNORE_INDEX,
            _material(rng, domain, [0.55, 0.5, 0.45], 0.2))
        z = rng.uniform(-2, 4)
        while z < 70:  # building facades
            width = rng.uniform(6, 14)
            height = rng.uniform(5, 16)
            x = side * (road_half + 8.0 + rng.uniform(0, 4))
            colour = rng.choice([[0.6, 0.55, 0.5], [0.7, 0.4, 0.3], [0.45, 0.5, 0.6], [0.8, 0.8, 0.75]])
            add("box", (2.5, height / 2, width / 2), rotation(rng.uniform(-0.05, 0.05)),
                np.array([x, cam_h - height / 2, z + width / 2]), BUILDING, _material(rng, domain, colour))
            z += width + rng.uniform(0.5, 6)
        for _ in range(rng.integers(1, 4)):  # trees: trunk + crown, both "vegetation" (vKITTI Tree)
            z = rng.uniform(6, 40)
            x = side * (road_half + rng.uniform(1.5, 3.5))
            top = rng.uniform(3, 5)
            add("cylinder", (0.15, top / 2), eye, np.array([x, cam_h - top / 2, z]), VEGETATION,
                _material(rng, domain, [0.35, 0.25, 0.15], 0.1))
            add("sphere", (rng.uniform(1.2, 2.2),), eye, np.array([x, cam_h - top - 1.0, z]), VEGETATION,
                _material(rng, domain, [0.25, 0.55, 0.15], 0.2, family="noise" if domain == "train" else "grain"))
        for _ in range(rng.integers(1, 3)):  # poles with a light or a sign
            z = rng.uniform(5, 35)
            x = side * (road_half + rng.uniform(0.5, 1.2))
            top = rng.uniform(3.5, 5.5)
            add("cylinder", (0.1, top / 2), eye, np.array([x, cam_h - top / 2, z]), POLE,
                _material(rng, domain, [0.6, 0.6, 0.6], 0.05, family="flat"))
            if rng.random() < 0.5:
                add("box", (0.2, 0.45, 0.2), eye, np.array([x, cam_h - top - 0.45, z]), LIGHT,
                    _material(rng, domain, [0.9, 0.65, 0.1], 0.1, gloss=0.3))
            else:  # a disc facing the road
                add("cylinder", (0.45, 0.03), rotation(pitch=np.pi / 2), np.array([x, cam_h - top + 0.3, z - 0.1]), SIGN,
                    _material(rng, domain, [0.9, 0.9, 0.1], 0.1, family="flat"))
    speed_range = (-0.8, 1.2)
    for _ in range(rng.integers(2, 6)):  # vehicles: body + cabin, moving together
        lane = rng.uniform(-road_half + 1.2, road_half - 1.2)
        z = rng.uniform(5, 35)
        length, width = rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9)
        yaw = rng.uniform(-0.15, 0.15)
        motion = _translation([0, 0, rng.uniform(*speed_range)]) if rng.random() < 0.7 else _translation([0, 0, 0])
        colour = rng.uniform(0.1, 0.9, 3)
        mat = _material(rng, domain, colour, 0.05, gloss=0.4 if domain == "train" else 0.7, family="flat")
        add("box", (width / 2, 0.45, length / 2), rotation(yaw), np.array([lane, cam_h - 0.75, z]), VEHICLE, mat, motion)
        add("box", (width / 2 * 0.9, 0.35, length / 4), rotation(yaw), np.array([lane, cam_h - 1.5, z - 0.2]), VEHICLE,
            _material(rng, domain, colour * 0.6, 0.05, gloss=mat.gloss, family="flat"), motion)
    camera = dict(forward=rng.uniform(0.4, 1.4), yaw=rng.uniform(-0.03, 0.03), side=rng.uniform(-0.05, 0.05))
    return objs, camera


def _indoor(rng, domain: str) -> tuple[list, dict]:
    objs = []
    add = lambda *a, **k: objs.append(Primitive(*a, **k))  # noqa: E731
    w, h, d = rng.uniform(4, 8), rng.uniform(2.6, 3.4), rng.uniform(5, 10)
    cam_y = rng.uniform(1.2, 1.7)  # camera height above the floor
    centre = np.array([rng.uniform(-0.3, 0.3) * w / 2, cam_y - h / 2, d / 2 - 0.8])
    add("box", (w / 2, h / 2, d / 2), rotation(rng.uniform(-0.3, 0.3)), centre, IGNORE_INDEX,
        _material(rng, domain, rng.uniform(0.4, 0.85, 3), 0.2))
    floor_y = cam_y
    for _ in range(rng.integers(3, 8)):  # furniture and objects on the floor
        shape = rng.choice(["box", "box", "sphere", "cylinder"])
        x, z = rng.uniform(-w / 2 + 0.6, w / 2 - 0.6), rng.uniform(1.5, d - 1.5)
        if shape == "box":
            size = (rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.9))
            y = floor_y - size[1]
        elif shape == "sphere":
            size = (rng.uniform(0.2, 0.6),)
            y = floor_y - size[0] - rng.uniform(0, 0.8)
        else:
            size = (rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9))
            y = floor_y - size[1]
        moving = rng.random() < 0.3
        motion = (rotation(rng.uniform(-0.1, 0.1)), rng.uniform(-0.15, 0.15, 3) * [1, 0, 1]) if moving else (np.eye(3), np.zeros(3))
        pos = np.array([x, y, z])
        if moving:  # rotate about the object's own centre
            motion = (motion[0], pos - motion[0] @ pos + motion[1])
        add(shape, size, rotation(rng.uniform(-np.pi, np.pi)), pos, IGNORE_INDEX,
            _material(rng, domain, rng.uniform(0.1, 0.9, 3), 0.3, gloss=rng.choice([0.0, 0.0, 0.5])), motion)
    camera = dict(forward=rng.uniform(0.05, 0.3), yaw=rng.uniform(-0.06, 0.06), side=rng.uniform(-0.1, 0.1))
    return objs, camera


def _flying(rng, domain: str) -> tuple[list, dict]:
    objs = []
    # the backdrop: a far textured wall (FlyingThings3D keeps everything within 35 m)
    objs.append(Primitive("box", (40.0, 30.0, 1.0), rotation(rng.uniform(-0.2, 0.2), rng.uniform(-0.1, 0.1)),
                          np.array([0, 0, rng.uniform(28, 33)]), IGNORE_INDEX,
                          _material(rng, domain, rng.uniform(0.2, 0.8, 3), 0.4)))
    for _ in range(rng.integers(5, 11)):
        shape = rng.choice(["box", "sphere", "cylinder"])
        size = {"box": tuple(rng.uniform(0.3, 1.5, 3)), "sphere": (rng.uniform(0.4, 1.5),),
                "cylinder": (rng.uniform(0.2, 0.8), rng.uniform(0.4, 1.5))}[shape]
        z = rng.uniform(4, 22)
        pos = np.array([rng.uniform(-0.5, 0.5) * z, rng.uniform(-0.3, 0.3) * z, z])
        rot = rotation(*rng.uniform(-np.pi, np.pi, 3))
        spin = rotation(*rng.uniform(-0.15, 0.15, 3))
        shift = rng.uniform(-0.6, 0.6, 3)
        objs.append(Primitive(shape, size, rot, pos, IGNORE_INDEX,
                              _material(rng, domain, rng.uniform(0.1, 0.9, 3), 0.4, gloss=rng.choice([0.0, 0.4])),
                              (spin, pos - spin @ pos + shift)))
    camera = dict(forward=rng.uniform(-0.3, 0.5), yaw=rng.uniform(-0.05, 0.05), side=rng.uniform(-0.3, 0.3))
    return objs, camera


def make_scene(kind: str, seed: int, domain: str = "train", light_seed: int | None = None) -> Scene:
    """Draw the scene of ``(kind, seed, domain)``; independent of the image size.

    ``light_seed`` redraws only the lights (same geometry and materials), as
    the multi-illumination MID dataset shows one scene under many lights.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _KIND_ID[kind], _DOMAIN_ID[domain], 20240611])
    objects, cam = {"street": _street, "indoor": _indoor, "flying": _flying}[kind](rng, domain)
    real = domain == "real"
    lrng = rng if light_seed is None else \
        np.random.default_rng([int(light_seed) & 0xFFFFFFFF, _KIND_ID[kind], _DOMAIN_ID[domain], 7])
    lights = []
    if kind == "indoor":
        room_rot, room_pos = objects[0].rotation, objects[0].position
        half = np.asarray(objects[0].size)
        for _ in range(lrng.integers(1, 3)):
            local = lrng.uniform(-0.7, 0.7, 3) * half
            local[1] = -half[1] * 0.85  # under the ceiling
            colour = np.ones(3) if not real else np.array([1.0, lrng.uniform(0.8, 0.95), lrng.uniform(0.6, 0.85)])
            lights.append(Light(None, room_rot @ local + room_pos, colour, lrng.uniform(0.8, 1.3)))
        ambient = lrng.uniform(0.2, 0.3) * (np.ones(3) if not real else np.array([0.9, 0.95, 1.05]))
    else:
        elevation = lrng.uniform(0.5, 1.2) if not real else lrng.uniform(0.25, 0.6)
        azimuth = lrng.uniform(-np.pi, np.pi)
        direction = np.array([np.cos(elevation) * np.sin(azimuth), -np.sin(elevation), np.cos(elevation) * np.cos(azimuth)])
        if kind == "flying":  # light from the camera's side: the backdrop would shadow everything otherwise
            direction[2] = -abs(direction[2])
        colour = np.ones(3) if not real else np.array([1.0, lrng.uniform(0.85, 0.95), lrng.uniform(0.7, 0.85)])
        lights.append(Light(direction, None, colour, lrng.uniform(0.6, 0.75)))
        ambient = lrng.uniform(0.25, 0.35) * (np.ones(3) if not real else np.array([0.8, 0.9, 1.1]))
    sky = None
    if kind == "street":
        sky = (np.array([0.75, 0.85, 0.95]), np.array([0.3, 0.5, 0.85])) if not real else \
              (np.array([0.8, 0.8, 0.82]), np.array([0.55, 0.6, 0.7]))
    focal = {"street": 0.584, "indoor": 0.866, "flying": 1.094}[kind] * (rng.uniform(0.85, 1.15) if real else 1.0)
    principal = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)) if real else (0.0, 0.0)
    cam2_rot = rotation(cam["yaw"], rng.uniform(-0.01, 0.01))
    cam2_pos = np.array([cam["side"], rng.uniform(-0.02, 0.02), cam["forward"]])
    sensor = {}
    if real:
        sensor = dict(blur=rng.uniform(0.5, 1.0), gains=rng.uniform(0.85, 1.15, 3), gamma=rng.uniform(0.8, 1.25),
                      vignette=rng.uniform(0.1, 0.3), noise=rng.uniform(0.01, 0.03), noise_seed=int(rng.integers(1 << 30)))
    return Scene(kind, domain, objects, lights, ambient, sky, focal, principal, cam2_rot, cam2_pos, sensor)


# --------------------------------------------------------------------------- rendering

def intrinsics(scene: Scene, height: int, width: int) -> np.ndarray:
    f = scene.focal * width
    cx = (width - 1) / 2 + scene.principal[0] * width
    cy = (height - 1) / 2 + scene.principal[1] * height
    return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])


def _pixel_rays(K: np.ndarray, height: int, width: int) -> np.ndarray:
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], 1)
    return pix @ np.linalg.inv(K).T  # unit z: t along these rays is the planar depth


def _shade(scene: Scene, hits: Hits, origins, dirs, time: int):
    """Albedo, shading and the specular term of every ray's hit (zero where it escapes)."""
    n = len(dirs)
    albedo, shading, spec = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros((n, 3))
    hit = hits.index >= 0
    if not hit.any():
        return albedo, shading, spec
    idx = np.nonzero(hit)[0]
    points = origins[idx] + hits.t[idx, None] * dirs[idx]
    normals = hits.normal[idx]
    for k in np.unique(hits.index[idx]):
        sel = hits.index[idx] == k
        albedo[idx[sel]] = texture(scene.objects[k].material, hits.local[idx[sel]])
    shade = np.tile(scene.ambient, (len(idx), 1))
    view = -dirs[idx] / np.linalg.norm(dirs[idx], axis=1, keepdims=True)
    gloss = np.array([scene.objects[k].material.gloss for k in hits.index[idx]])
    highlight = np.zeros((len(idx), 3))
    for light in scene.lights:
        if light.direction is not None:
            to_light = np.broadcast_to(light.direction, points.shape)
            dist = np.full(len(idx), np.inf)
            power = np.full(len(idx), light.intensity)
        else:
            delta = light.position - points
            dist = np.linalg.norm(delta, axis=1)
            to_light = delta / dist[:, None]
            power = light.intensity / (1.0 + (dist / 2.0) ** 2)  # inverse square, softened near the lamp
        cos = (normals * to_light).sum(1)
        lit = cos > 0
        lit[lit] &= ~blocked(scene.objects, points[lit], to_light[lit], dist[lit], time)
        shade += (np.where(lit, cos * power, 0.0))[:, None] * light.color
        half = to_light + view
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        highlight += (np.where(lit, gloss * np.clip((normals * half).sum(1), 0, 1) ** 40, 0.0))[:, None] * light.color
    shading[idx] = np.clip(shade, 0, 1)
    spec[idx] = highlight
    return albedo, shading, spec


def _sky(scene: Scene, dirs: np.ndarray, rotation_to_world: np.ndarray) -> np.ndarray:
    horizon, zenith = scene.sky
    d = dirs @ rotation_to_world.T
    up = np.clip(-d[:, 1] / np.linalg.norm(d, axis=1), 0, 1) ** 0.5
    return horizon * (1 - up[:, None]) + zenith * up[:, None]


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)


def _sensor(img: np.ndarray, sensor: dict, frame: int) -> np.ndarray:
    """The "real" camera: blur, white balance, gamma, vignetting and noise."""
    if not sensor:
        return img
    h, w = img.shape[:2]
    out = _gaussian_blur(img, sensor["blur"] * max(h, w) / 256).astype(np.float64)
    out = np.clip(out * sensor["gains"], 0, 1) ** sensor["gamma"]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx - (w - 1) / 2) / (w / 2)) ** 2 + ((yy - (h - 1) / 2) / (h / 2)) ** 2
    out *= (1 - sensor["vignette"] * r2 / 2)[..., None]
    noise = np.random.default_rng([sensor["noise_seed"], frame]).normal(0, sensor["noise"], out.shape)
    return np.clip(out + noise, 0, 1)


def _render_frame(scene: Scene, K: np.ndarray, height: int, width: int, time: int):
    """Cast the camera of frame ``time`` (1 or 2) into the scene posed at ``time``."""
    rot, pos = (np.eye(3), np.zeros(3)) if time == 1 else (scene.cam2_rotation, scene.cam2_position)
    cam_dirs = _pixel_rays(K, height, width)
    dirs = cam_dirs @ rot.T
    origins = np.broadcast_to(pos, dirs.shape)
    hits = cast(scene.objects, origins, dirs, time)
    albedo, shading, spec = _shade(scene, hits, origins, dirs, time)
    rgb = albedo * shading + spec
    escaped = hits.index < 0
    if scene.sky is not None and escaped.any():
        rgb[escaped] = _sky(scene, cam_dirs[escaped], rot)
    return hits, dirs, albedo, shading, spec, np.clip(rgb, 0, 1)


def _motion(scene, K, hits, dirs, points1, height: int, width: int):
    """Optical flow, scene flow, where the flow is defined and where it is valid (visible in frame 2)
    of the surface points ``points1`` seen by camera 1."""
    hit = hits.index >= 0
    # frame 2: every surface point moves with its object; express it in camera 2
    world2 = np.zeros_like(points1)
    for k in np.unique(hits.index[hit]):
        sel = hits.index == k
        rot2, pos2 = scene.objects[k].pose(2)
        world2[sel] = hits.local[sel] @ rot2.T + pos2
    cam2 = (world2 - scene.cam2_position) @ scene.cam2_rotation  # R^T (X - c)
    z2 = cam2[:, 2]
    proj = cam2 @ K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv2 = proj[:, :2] / proj[:, 2:3]
    v, u = np.mgrid[0:height, 0:width]
    uv1 = np.stack([u.ravel(), v.ravel()], 1).astype(np.float64)
    flow = np.where(hit[:, None] & (z2[:, None] > EPS), uv2 - uv1, 0.0)
    scene_flow = np.where(hit[:, None], cam2 - points1, 0.0)

    # flow is defined for every surface point in front of camera 2 (occluded or not, as in
    # FlyingThings3D and KITTI's flow_occ); valid_flow adds: inside frame 2 and visible there
    defined = hit & (z2 > 0.05)
    flow = np.where(defined[:, None], flow, 0.0)
    inside = defined & (uv2[:, 0] >= 0) & (uv2[:, 0] <= width - 1) & (uv2[:, 1] >= 0) & (uv2[:, 1] <= height - 1)
    valid_flow = np.zeros(len(dirs), bool)
    if inside.any():
        towards = world2[inside] - scene.cam2_position
        reach = cast(scene.objects, np.broadcast_to(scene.cam2_position, towards.shape), towards, 2)
        same = (reach.index == hits.index[inside]) & (np.abs(reach.t - 1.0) < 1e-4)
        valid_flow[np.nonzero(inside)[0][same]] = True
    return flow, scene_flow, defined, valid_flow


def scale_intrinsics(K, factor: float) -> np.ndarray:
    """``K`` of an image resized by ``factor``, pixel centres kept: ``f x factor``,
    ``c' = (c + 0.5) x factor - 0.5`` (the convention of ``transforms.resize``)."""
    K = np.array(K, dtype=np.float64)
    K[:2, :2] *= factor
    K[:2, 2] = (K[:2, 2] + 0.5) * factor - 0.5
    return K


def _upsample(low: dict, scale: int, height: int, width: int, K: np.ndarray) -> dict:
    """A sample rendered one ray per ``scale`` x ``scale`` block -> ``height`` x ``width``: every raster
    repeated over its block (nearest) and cut to size, then depth and optical flow taken at each
    pixel's own ray (``_on_block_planes``)."""
    out = dict(low)
    shape = low["depth"].shape
    for key, value in low.items():
        if isinstance(value, np.ndarray) and value.shape[:2] == shape and key not in ("K", "cam2_from_cam1"):
            out[key] = np.repeat(np.repeat(value, scale, 0), scale, 1)[:height, :width]
    out["depth"], out["optical_flow"] = _on_block_planes(out, K, scale)
    out["K"] = K
    return out


def _on_block_planes(s: dict, K: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth and optical flow of each pixel from its block's hit (point, normal and scene flow
    repeated over the block): depth where the pixel's ray meets the tangent plane of the block's
    surface, flow the projection of that point moved by the block's scene flow. Exact on the
    world's quads and boxes moving without rotation, and equal to the block's own values (flow x
    ``scale``) at its centre; so depth gradients survive (normals estimated from depth, vKITTI's
    D2NT, stay right: repeated depth would make every block a fronto-parallel step) and scene flow
    projects onto optical flow as in a full render. A pixel whose ray meets the plane grazingly
    (outside half to twice the block's depth) keeps the block's depth; a point that would come
    within 5 cm of camera 2's plane keeps the block's flow x ``scale``."""
    h, w = s["depth"].shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    centre = lambda x: (x // scale + 0.5) * scale - 0.5  # noqa: E731  the block centre's pixel coordinate
    ray = lambda x, y: np.stack([(x - K[0, 2]) / K[0, 0], (y - K[1, 2]) / K[1, 1], np.ones_like(x)], -1)  # noqa: E731
    n = s["normal"].astype(np.float64)
    d = s["depth"].astype(np.float64)
    along = (n * ray(u, v)).sum(-1)  # < 0: the plane faces the pixel's ray
    with np.errstate(divide="ignore", invalid="ignore"):
        planar = d * (n * ray(centre(u), centre(v))).sum(-1) / along
        depth = np.where((d > 0) & (along < 0) & (planar > d / 2) & (planar < 2 * d), planar, d)
        moved = depth[..., None] * ray(u, v) + s["scene_flow"]  # camera-2 coordinates at time 2
        z2 = moved[..., 2]
        projected = np.stack([K[0, 0] * moved[..., 0] / z2 + K[0, 2] - u,
                              K[1, 1] * moved[..., 1] / z2 + K[1, 2] - v], -1)
    defined = s["flow_defined"]
    flow = np.where((defined & (z2 > 0.05))[..., None], projected, s["optical_flow"] * scale)
    return depth.astype(np.float32), np.where(defined[..., None], flow, 0.0).astype(np.float32)


def render_sample(kind: str, seed: int, height: int, width: int, domain: str = "train",
                  light_seed: int | None = None, K=None, render_scale: int = 1) -> dict:
    """Render one sample; see the module docstring for the conventions.

    Returns float32 arrays (H x W [x C]): ``rgb``, ``rgb_next``, ``rgb_linear``,
    ``rgb_next_linear``, ``depth`` (0 where nothing is hit), ``normal``,
    ``semantic`` (int32; 250 = ignore), ``albedo``, ``shading``,
    ``optical_flow``, ``scene_flow``, ``valid_flow`` (visible in frame 2),
    ``flow_defined`` (a surface point in front of camera 2, occluded or not), ``lambertian``,
    ``object_id`` (int32, -1 = sky), ``K`` (3 x 3), ``cam2_from_cam1`` (4 x 4:
    maps camera-1 coordinates of a static point to its camera-2 coordinates),
    and ``kind``, ``domain``, ``seed``.

    ``K``: the camera (3 x 3 intrinsics at ``height`` x ``width``, zero skew) instead of the
    scene's own ``intrinsics(scene, height, width)``, e.g. a real dataset's.
    ``render_scale`` s (an integer >= 1): one ray per s x s block, i.e. an image of
    ceil(height / s) x ceil(width / s) through ``scale_intrinsics(K, 1 / s)`` (each ray passes
    through its block's centre), every value then repeated over its block and the result cut
    to ``height`` x ``width``: a nearest upsampling whose intrinsics are exactly ``K``. Normals,
    scene flow (metres), classes, colours and masks are the block's; depth and optical flow are
    taken at each pixel's own ray on the plane of the block's surface (``_on_block_planes``; at
    the block centre: the block's depth and its flow x s), so depth gradients survive and scene
    flow projects onto optical flow. About s^2 times faster; edges, textures and masks are s
    pixels coarse. s = 1 renders every pixel.
    """
    if height < 2 or width < 2:
        raise ValueError(f"image size must be at least 2 x 2, got {height} x {width}")
    if isinstance(render_scale, bool) or int(render_scale) != render_scale or render_scale < 1:
        raise ValueError(f"render_scale must be an integer >= 1 (rays every s pixels), got {render_scale!r}")
    scene = make_scene(kind, seed, domain, light_seed)
    if K is None:
        K = intrinsics(scene, height, width)
    else:
        K = np.array(K, dtype=np.float64)
        if K.shape != (3, 3) or K[0, 1] != 0 or K[2].tolist() != [0, 0, 1] or K[1, 0] != 0:
            raise ValueError(f"K must be 3 x 3 intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}")
    scale = int(render_scale)
    if scale > 1:
        if -(-height // scale) < 2 or -(-width // scale) < 2:
            raise ValueError(f"render_scale {scale} leaves fewer than 2 x 2 rays for {height} x {width}; "
                             f"use a smaller render_scale")
        low = render_sample(kind, seed, -(-height // scale), -(-width // scale), domain, light_seed,
                            K=scale_intrinsics(K, 1 / scale))
        return _upsample(low, scale, height, width, K)
    hits, dirs, albedo, shading, spec, rgb = _render_frame(scene, K, height, width, 1)
    hit = hits.index >= 0
    depth = np.where(hit, hits.t, 0.0)  # rays have unit z, so t is planar depth
    with np.errstate(invalid="ignore"):  # inf x 0 where a ray that escapes has a zero component
        points1 = np.where(hit[:, None], hits.t[:, None] * dirs, 0.0)

    flow, scene_flow, defined, valid_flow = _motion(scene, K, hits, dirs, points1, height, width)

    _, _, _, _, _, rgb_next = _render_frame(scene, K, height, width, 2)
    semantic = np.full(len(dirs), IGNORE_INDEX, np.int32)
    semantic[hit] = [scene.objects[k].semantic for k in hits.index[hit]]
    if scene.sky is not None:
        semantic[~hit] = SKY
    normal_cam = hits.normal  # world = camera 1
    lambertian = hit & (spec.max(1) < 1e-6)

    shape = (height, width)
    img = lambda a, c=3: a.reshape(*shape, c).astype(np.float32)  # noqa: E731
    rgb1, rgb2 = img(rgb), img(rgb_next)
    motion = np.eye(4)
    motion[:3, :3] = scene.cam2_rotation.T
    motion[:3, 3] = -scene.cam2_rotation.T @ scene.cam2_position
    return {
        "rgb": _sensor(rgb1, scene.sensor, 1).astype(np.float32),
        "rgb_next": _sensor(rgb2, scene.sensor, 2).astype(np.float32),
        "rgb_linear": rgb1,
        "rgb_next_linear": rgb2,
        "depth": depth.reshape(shape).astype(np.float32),
        "normal": img(normal_cam),
        "semantic": semantic.reshape(shape),
        "albedo": img(albedo),
        "shading": img(shading),
        "optical_flow": img(flow, 2),
        "scene_flow": img(scene_flow),
        "valid_flow": valid_flow.reshape(shape),
        "flow_defined": defined.reshape(shape),
        "lambertian": lambertian.reshape(shape),
        "object_id": hits.index.reshape(shape).astype(np.int32),
        "K": K.astype(np.float64),
        "cam2_from_cam1": motion,
        "kind": kind,
        "domain": domain,
        "seed": int(seed),
    }


def stable_seed(*parts) -> int:
    """A seed from names and numbers that is the same on every machine and Python run."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
