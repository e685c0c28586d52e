"""An ipywidgets browser of the predictions of a results folder (from the prediction cache only).

    from stablemtl.browse import Browser
    Browser("results/demo").widget   # in a notebook cell

Dropdowns choose the model and the benchmark (which fixes the task), a slider
the sample; four PNG images show the input, the ground truth, the prediction
and an error map, with the sample's metrics from ``per_sample.csv`` below. A model evaluated with
several seeds is shown with its first seed's predictions (``results.prediction_folder``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from stablemtl.benchmarks import BENCHMARKS
from stablemtl.figures import colorize_cached
from stablemtl.paths import SAMPLES_FILE
from stablemtl.results import prediction_folder


def _png(rgb: np.ndarray, scale: int = 2) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def error_map(task: str, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-pixel error as a heat map (uint8 RGB; black where the ground truth is invalid): angular
    error for normals, wrong class for semantics, |difference| (per-image scaled) otherwise."""
    import matplotlib

    if task == "semantic":
        err = (pred != gt).astype(np.float64)
    elif task == "normal":
        p = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
        err = np.degrees(np.arccos(np.clip((p * gt).sum(-1), -1, 1))) / 90.0
    else:
        diff = np.abs(pred - gt) if pred.shape == gt.shape else np.abs(pred[..., 0] - gt[..., 0])
        err = diff.mean(-1) if diff.ndim == 3 else diff
        top = np.percentile(err[valid], 99) if valid.any() else 1.0
        err = err / (top if top > 0 else 1.0)
    rgb = (matplotlib.colormaps["magma"](np.clip(err, 0, 1))[..., :3] * 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


class Browser:
    """Widgets over ``<results_dir>/predictions/<model>[/seed<first seed>]/<benchmark>/NNNNN.npz``."""

    def __init__(self, results_dir):
        import ipywidgets as w

        self.root = Path(results_dir)
        pred_dir = self.root / "predictions"
        if not pred_dir.is_dir():
            raise FileNotFoundError(f"{pred_dir}: no prediction cache in this results folder "
                                    f"(stablemtl.evaluate.evaluate writes it)")
        self.models = sorted(p.name for p in pred_dir.iterdir() if p.is_dir())
        if not self.models:
            raise FileNotFoundError(f"{pred_dir}: empty prediction cache")
        self.metrics = self._per_sample()
        self.model = w.Dropdown(options=self.models, description="model")
        self.benchmark = w.Dropdown(description="benchmark")
        self.index = w.IntSlider(min=0, max=0, description="sample", continuous_update=False)
        self.images = {k: w.Image(format="png") for k in ("input", "ground truth", "prediction", "error")}
        self.caption = w.HTML()
        boxes = [w.VBox([w.HTML(f"<b>{k}</b>"), img]) for k, img in self.images.items()]
        self.widget = w.VBox([w.HBox([self.model, self.benchmark, self.index]), w.HBox(boxes), self.caption])
        self.model.observe(lambda _: self._benchmarks(), names="value")
        self.benchmark.observe(lambda _: self._samples(), names="value")
        self.index.observe(lambda _: self.show(), names="value")
        self._benchmarks()

    def _per_sample(self) -> dict:
        path = self.root / SAMPLES_FILE
        table: dict = {}
        if path.is_file():
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    key = (r["model"], r.get("seed", ""), r["benchmark"], int(r["index"]))  # no seed: an older file
                    table.setdefault(key, {})[r["metric"]] = float(r["value"])
        return table

    def _benchmarks(self) -> None:
        folder, _ = prediction_folder(self.root, self.model.value)
        options = [b for b in BENCHMARKS if (folder / b).is_dir() and any((folder / b).iterdir())]
        self.benchmark.options = options
        if options and self.benchmark.value not in options:
            self.benchmark.value = options[0]
        self._samples()

    def _files(self) -> list[Path]:
        if not self.benchmark.value:
            return []
        folder, _ = prediction_folder(self.root, self.model.value)
        return sorted((folder / self.benchmark.value).glob("*.npz"))

    def _samples(self) -> None:
        n = len(self._files())
        self.index.max = max(0, n - 1)
        if self.index.value > self.index.max:
            self.index.value = 0
        self.show()

    def show(self) -> None:
        files = self._files()
        if not files:
            self.caption.value = "no cached predictions"
            return
        file = files[min(self.index.value, len(files) - 1)]
        task = BENCHMARKS[self.benchmark.value].task
        with np.load(file, allow_pickle=False) as s:
            pred, gt, valid, rgb, sample_id = s["pred"], s["gt"], s["valid"], s["rgb"], str(s["id"])
        self.images["input"].value = _png(rgb)
        self.images["ground truth"].value = _png(colorize_cached(task, gt, valid))
        self.images["prediction"].value = _png(colorize_cached(task, pred))
        self.images["error"].value = _png(error_map(task, pred, gt, valid))
        index, seed = int(file.stem), prediction_folder(self.root, self.model.value)[1]
        scores = self.metrics.get((self.model.value, seed, self.benchmark.value, index), {})
        text = ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) or "no per-sample metrics"
        where = f", seed {seed}" if seed else ""
        self.caption.value = f"<code>{sample_id}</code> ({task}, sample {index}{where}): {text}"
