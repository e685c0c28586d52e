"""The eight zero-shot benchmarks (docs/method.md, "Evaluation"): dataset, task, the release's evaluation
resolution, depth range and flow units, each benchmark's headline metric and its accumulator.

Torch-free: the result tables (``stablemtl.report``) and the parameter schema name the benchmarks from here;
the prediction loop that scores them is ``stablemtl.evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from stablemtl import metrics


@dataclass(frozen=True)
class Benchmark:
    name: str
    dataset: str  # stablemtl.data.sources name
    task: str
    resolution: tuple[int, int]  # the release's evaluation resolution
    depth_range: tuple[float, float] | None = None
    native_units: bool = False  # KITTI flow: flow values stay in the ground truth's full-resolution pixels

    @property
    def headline(self) -> str:
        """The benchmark's headline metric (``metrics.HEADLINE`` of its task)."""
        return metrics.HEADLINE[self.task]

    def accumulator(self, silog: str):
        """A fresh accumulator of the benchmark's dataset-level metrics (``silog``: ``stablemtl.options``)."""
        return {"depth": lambda: metrics.DepthAccumulator(depth_range=self.depth_range, silog=silog),
                "normal": metrics.NormalAccumulator, "semantic": metrics.SemanticConfusion,
                "optical_flow": metrics.FlowAccumulator, "scene_flow": metrics.SceneFlowAccumulator,
                "albedo": metrics.IntrinsicAccumulator, "shading": metrics.IntrinsicAccumulator}[self.task]()


BENCHMARKS = {b.name: b for b in (
    Benchmark("cityscapes_semantic", "cityscapes", "semantic", (256, 512)),
    Benchmark("kitti_depth", "kitti_depth", "depth", (176, 608), (1e-5, 80.0)),
    Benchmark("diode_depth", "diode", "depth", (384, 512), (0.6, 350.0)),
    Benchmark("diode_normal", "diode", "normal", (384, 512)),
    Benchmark("kitti_flow", "kitti_flow", "optical_flow", (176, 608), native_units=True),
    Benchmark("kitti_scene_flow", "kitti_flow", "scene_flow", (176, 608), native_units=True),
    Benchmark("mid_albedo", "mid", "albedo", (256, 384)),
    Benchmark("mid_shading", "mid", "shading", (256, 384)),
)}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}") from None



def benchmarks_of(task: str) -> list[str]:
    return [name for name, b in BENCHMARKS.items() if b.task == task]
