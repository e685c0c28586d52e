"""The places where the kit can differ from the StableMTL release, as named options.

Each option's first value is the default and is the release's behaviour
(docs/method.md, "Release parity", explains each one and why the alternative
exists). The code that acts on an option takes it as a keyword argument of
the same name and checks it with ``check``:

| option | release (default) | alternative | acts in |
|---|---|---|---|
| ``invalid_targets`` | ``keep``: invalid pixels keep their raw annotation in the target | ``fill``: a fixed value | ``tasks.Task.encode``, sources, training |
| ``normals`` | ``as_stored``: normals as the dataset files hold them | ``facing``: negated to face the camera | sources, training, evaluation |
| ``target_order`` | ``normalise_then_resize``: targets encoded at the file's resolution | ``resize_then_normalise`` | sources, training |
| ``silog`` | ``x100`` | ``fraction`` | ``metrics.depth_metrics``, evaluation |
| ``flow_scoring`` | ``eval_resolution``: KITTI flow scored at 176 x 608, values in full-resolution pixels | ``native``: at the ground truth's 352 x 1216 | evaluation |
"""

from __future__ import annotations

OPTIONS: dict[str, tuple[str, ...]] = {
    "invalid_targets": ("keep", "fill"),
    "normals": ("as_stored", "facing"),
    "target_order": ("normalise_then_resize", "resize_then_normalise"),
    "silog": ("x100", "fraction"),
    "flow_scoring": ("eval_resolution", "native"),
}
DEFAULTS = {name: values[0] for name, values in OPTIONS.items()}


def check(name: str, value) -> str:
    """``value`` when it is one of option ``name``'s values; otherwise a ``ValueError`` listing them."""
    values = OPTIONS[name]
    if value not in values:
        raise ValueError(f"{name}={value!r} is not a valid choice; valid: {', '.join(repr(v) for v in values)} "
                         f"({values[0]!r}, the default, is the StableMTL release's behaviour)")
    return value
