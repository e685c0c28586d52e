"""Zero-shot evaluation on the eight benchmarks (docs/method.md, "Evaluation"), written as files.

``evaluate(model, benchmarks, out_dir, data_root)`` predicts every image of each
benchmark (batch 1, one step, at the benchmark's evaluation resolution; benchmarks on the
same images, such as DIODE depth and normals, share one pipeline call per image), scores
it with the release's protocol, and writes into ``out_dir``:

- ``metrics.csv``: tidy, one row per (model, seed, benchmark, metric): run, model, seed,
  benchmark, dataset, task, metric, value, higher_is_better, n_images;
- ``per_sample.csv``: one row per (model, seed, benchmark, image, metric);
- ``predictions/<model>/seed<seed>/<benchmark>/<NNNNN>.npz`` (``predictions/<model>/<benchmark>/``
  without a seed): compressed prediction, ground truth, mask and input of every image, for the
  browser and for resuming.

``seed`` is the training seed of the model evaluated (``evaluate(..., seed=1)``), empty for the
seed-independent rows (``trivial``, ``vae_ceiling``); the rows of one seed never replace another's.
CSVs written before the kit had the column (header without ``seed``) are read with an empty seed.

Next to the CSVs, ``results.sha256.json`` records their sha256 as written, so that
``stablemtl.report`` can tell a table made from a hand-edited CSV (``results_hashes``).

A half-done evaluation resumes: images whose predictions are cached are read
back instead of predicted again, so the files equal those of an uninterrupted
run. The cache of a benchmark records what its predictions came from (a
fingerprint of the model's weights, the data, the resolution and the protocol,
in ``cache.json``); when any of it differs, the cached predictions are deleted
and predicted anew, so a model never scores another model's predictions. A cache file that
cannot be read (a truncated ``.npz``, a corrupt ``cache.json``) is set aside as
``<name>.corrupt`` with a message and recomputed, so one bad file never fails every rerun.
The protocol is the release's (``stablemtl.options``): KITTI flow and scene
flow are scored at the evaluation resolution against ground truth sampled
nearest-exact, flow values in full-resolution pixels (``flow_scoring="native"``
scores at the ground truth's resolution instead); SILog is x100; the normals'
convention is the model's own. Besides models, two reference rows can be computed on the same images:
``trivial`` (constant or input-derived predictions) and ``vae_ceiling`` (the
ground truth encoded and decoded by the frozen VAE, i.e. the best a latent
regressor can do).

A model runs on ``device`` (default: the GPU when there is one, ``stablemtl.devices``), moved
there once, optionally in ``dtype`` (``torch.bfloat16``; its
predictions are cached apart from float32 ones, as the weights' fingerprint records the dtype);
ground truth and metrics stay on the CPU. While it predicts one image, a background thread
loads the next ones (``prefetch``); the files are the same with or without it.
"""

from __future__ import annotations

import copy
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from stablemtl import devices, metrics, options
from stablemtl.benchmarks import Benchmark, benchmarks_of, get_benchmark
from stablemtl.data.formats import read_json_if_present, set_aside_corrupt, write_bytes
from stablemtl.data.sources import SOURCES
from stablemtl.model.fingerprint import model_fingerprint, module_fingerprint
from stablemtl.model.pipeline import StableMTLPipeline, load_model
from stablemtl.model.vae import vae_roundtrip
from stablemtl.paths import METRICS_FILE, SAMPLES_FILE, in_project
from stablemtl.progress import bar as progress_bar
from stablemtl.results import (METRIC_FIELDS, SAMPLE_FIELDS, TIMING_FILE, CsvRows, edited_results,
                               read_or_set_aside, seed_text, value_text, write_hashes)
from stablemtl.tasks import FLOW_TASKS, SEMANTIC_CLASSES, get_task, to_grey

# bump when a change of the kit changes what a cached prediction holds (decoding, resizing, ground truth)
PROTOCOL_VERSION = 2
CACHE_FILE = "cache.json"
# what reading a truncated or corrupt .npz raises (zip, pickle-free numpy header, missing array)
_NPZ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError)

def _hwc(x: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` tensor -> ``[H, W]`` (one channel) or ``[H, W, C]`` numpy."""
    x = x.detach().cpu()
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def ground_truth(sample: dict, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric's ground truth and mask: grey shading for shading, class ids, metric depth, ..."""
    gt, valid = sample[task], sample[f"{task}_valid"][0].numpy()
    if task == "shading":
        return to_grey(gt).numpy(), valid
    return _hwc(gt), valid


def _resize(pred: torch.Tensor, size, task: str) -> torch.Tensor:
    """Prediction ``[1, C, h, w]`` -> ground-truth size (nearest for class ids, bilinear otherwise)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    if task == "semantic":
        return torch.nn.functional.interpolate(pred.float(), size=size, mode="nearest-exact").long()
    return torch.nn.functional.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)


def trivial_prediction(sample: dict, task: str, majority_class: int = 0,
                       normals: str = options.DEFAULTS["normals"]) -> torch.Tensor:
    """Constant or input-derived predictions, the floor of every table: mid-grey depth (a constant,
    fitted by the alignment), fronto-parallel normals (in the ``normals`` convention: pointing away
    from the camera as stored, or facing it), the majority class, zero (scene) flow, the input image
    as albedo and its grey level as shading."""
    rgb = sample["rgb"]
    h, w = rgb.shape[-2:]
    if task == "depth":
        return torch.full((1, 1, h, w), 0.5)
    if task == "normal":
        z = 1.0 if options.check("normals", normals) == "as_stored" else -1.0
        return torch.tensor([0.0, 0.0, z])[None, :, None, None].expand(1, 3, h, w).clone()
    if task == "semantic":
        return torch.full((1, 1, h, w), majority_class, dtype=torch.long)
    if task == "optical_flow":
        return torch.zeros(1, 2, h, w)
    if task == "scene_flow":
        return torch.zeros(1, 3, h, w)
    if task == "albedo":
        return rgb[None].clone()
    return to_grey(rgb)[None, None]


def vae_ceiling_prediction(sample: dict, task: str, frozen) -> torch.Tensor:
    """The ground truth encoded as the task's target, through the frozen VAE, decoded as a prediction."""
    t = get_task(task)
    target, _ = t.encode(sample[task][None], sample[f"{task}_valid"][None])
    return t.decode(vae_roundtrip(frozen.vae, target))


def _cache_key(b: Benchmark, weights: str | None, source, size, normals: str, flow_scoring: str) -> dict:
    """What the cached predictions of a benchmark depend on; ``None`` weights: nothing to compare."""
    split = getattr(source, "split_file", "")
    return {"weights": weights, "data": in_project(source.root), "split": in_project(split) if split else "",
            "resolution": list(size), "normals": normals, "protocol": PROTOCOL_VERSION,
            "flow_scoring": flow_scoring if b.native_units else None}


def _open_cache(cache: Path, key: dict) -> None:
    """Keep the cached predictions of ``cache`` only when they were made under ``key``; a record that is
    not JSON is set aside (its predictions cannot be trusted, so they are predicted anew)."""
    record = cache / CACHE_FILE
    stored = None
    if record.is_file():
        try:
            stored = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            set_aside_corrupt(record, f"not valid JSON: {err}")
            stored = None
    if stored != key or key["weights"] is None:
        for file in cache.glob("[0-9]" * 5 + ".npz"):  # the kit's own files only
            file.unlink()
        record.write_text(json.dumps(key, indent=1) + "\n")


class _Predictor:
    """What ``evaluate`` scores: a model (through its pipeline), a reference row or a custom function,
    with its kind, name, normal convention, the fingerprint of its weights (the cache key) and the
    tasks it predicts (``None``: any)."""

    def __init__(self, model, model_name=None, expect_kind=None, fingerprint=None, normals=None, device=None,
                 dtype=None):
        self.model, self.tasks, self.memo, self.restore = model, None, {}, None
        self.timing = {"predicted": 0, "seconds": 0.0}  # of the benchmark being scored (``_score``)
        self.device = devices.resolve_device(device)
        if isinstance(model, tuple) and model and model[0] == "vae_ceiling":
            self.kind, self.frozen = "vae_ceiling", model[1]
            self.weights = "vae_ceiling:" + module_fingerprint({"vae": self.frozen.vae})
        elif isinstance(model, str) and model == "trivial":
            self.kind, self.weights = "trivial", "trivial"
        elif callable(model) and not isinstance(model, torch.nn.Module):
            self.kind, self.weights = "custom", fingerprint  # a function (sample, task) -> prediction [1, C, h, w]
            if model_name is None:
                raise ValueError("give a model_name for a custom predictor")
        else:
            if isinstance(model, (str, Path)):
                model = load_model(model, expect=expect_kind)
            elif expect_kind is not None and model.kind != expect_kind:
                raise ValueError(f"the model is a {model.kind!r} model, not a {expect_kind!r} one")
            else:
                self.restore = next(model.unet.parameters()).device  # the caller's model goes back there
            self._place(model, dtype)
            normals = model.normals if normals is None else normals
        self.normals = options.check("normals", normals or options.DEFAULTS["normals"])
        self.name = model_name or self.kind

    def _place(self, model, dtype) -> None:
        """The pipeline of ``model``, in ``dtype`` (a caller's model: on a copy), moved to the device once."""
        if dtype is not None and dtype != next(model.unet.parameters()).dtype:
            devices.check_dtype(dtype, self.device)
            if self.restore is not None:  # never cast the caller's weights in place
                model, self.restore = copy.deepcopy(model), None
            model.to(dtype)
        self.kind, self.tasks, self.weights = model.kind, list(model.tasks), model_fingerprint(model)
        self.pipe = StableMTLPipeline.from_model(model)
        if self.restore != self.device:
            self.pipe.to(self.device)

    def close(self) -> None:
        """Put a caller's model back on the device it came on."""
        if self.restore is not None and self.restore != self.device:
            self.pipe.to(self.restore)

    def predicts(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    def __call__(self, sample: dict, task: str, key: tuple, shared: list[str]) -> torch.Tensor:
        """The prediction ``[1, C, h, w]`` of ``task`` for ``sample``. A model predicts the ``shared``
        tasks of the same image (``key``) in one pipeline call and hands them out one by one."""
        if self.kind == "trivial":
            return trivial_prediction(sample, task, 0, self.normals)  # class 0, road: the majority class
        if self.kind == "vae_ceiling":
            return vae_ceiling_prediction(sample, task, self.frozen)
        if self.kind == "custom":
            return self.model(sample, task)
        if task not in self.memo.get(key, {}):
            nxt = sample["rgb_next"][None] if "rgb_next" in sample else None
            tasks = [t for t in shared if nxt is not None or t not in FLOW_TASKS]
            start = time.perf_counter()
            out = self.pipe(sample["rgb"][None], tasks=tasks, next_images=nxt).predictions
            self.memo[key] = {t: v.cpu() for t, v in out.items()}  # resized and scored on the CPU, as always
            self.timing["predicted"] += 1  # pipeline calls (one per image for the benchmarks sharing it)
            self.timing["seconds"] += time.perf_counter() - start
        out = self.memo[key].pop(task)
        if not self.memo[key]:
            del self.memo[key]  # every shared benchmark has taken its prediction
        return out


def _read_cached(file: Path, keys: tuple[str, ...]) -> dict | None:
    """Arrays ``keys`` of the cache entry ``file``; ``None`` when there is none, or when it cannot be read
    (truncated, corrupt, an array missing or non-finite where the kit never writes NaN: the id), in which
    case it is set aside as ``<name>.corrupt`` with a message and the image is predicted anew."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except _NPZ_ERRORS as err:
        set_aside_corrupt(file, f"not a complete prediction cache entry: {type(err).__name__}: {err}")
        return None


def _cached(file: Path, expected_id: str) -> dict | None:
    """A cached prediction (``pred``, ``gt``, ``valid``, ``id``) of the image ``expected_id``, if any."""
    stored = _read_cached(file, ("pred", "gt", "valid", "id", "rgb"))
    return stored if stored is not None and str(stored["id"]) == expected_id else None  # else the split changed


def _is_cached(file: Path, expected_id: str) -> bool:
    """Whether ``file`` holds the image ``expected_id`` (reads its id only; an entry found corrupt later,
    by ``_cached``, is set aside then and its image loaded and predicted in place)."""
    stored = _read_cached(file, ("id",))
    return stored is not None and str(stored["id"]) == expected_id


class _Prefetch:
    """``source[i]`` of the ``indices`` still to predict, loaded in order by one background thread,
    ``ahead`` at most waiting (0: loaded when asked, no thread)."""

    def __init__(self, source, indices, ahead: int):
        self.source, self.order, self.ahead, self.next, self.pending = source, list(indices), ahead, 0, {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="stablemtl-prefetch") if ahead > 0 and self.order else None
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and self.next < len(self.order) and len(self.pending) < self.ahead:
            i = self.order[self.next]
            self.pending[i], self.next = self.pool.submit(self.source.__getitem__, i), self.next + 1

    def __getitem__(self, i: int) -> dict:
        future = self.pending.pop(i, None)
        self._fill()  # the thread goes on with the next image while this one is predicted
        return self.source[i] if future is None else future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _score(b: Benchmark, predictor: _Predictor, source, cache: Path, n: int, shared: list[str], size, silog: str,
           progress: bool, prefetch: int = 0) -> tuple[dict, int, list[dict]]:
    """Predict (or read from ``cache``) and score the first ``n`` images of benchmark ``b``; returns the
    dataset-level metrics, the number of images scored and per-image rows (without run and model).
    ``prefetch``: how many of the images to predict are loaded ahead, in a background thread."""
    acc = b.accumulator(silog)
    rows = []
    todo = [i for i in range(n) if not _is_cached(cache / f"{i:05d}.npz", source.entries[i][0])]
    samples = _Prefetch(source, todo, prefetch)
    predictor.timing = {"predicted": 0, "seconds": 0.0}
    try:
        for i in progress_bar(range(n), desc=f"{predictor.name} / {b.name}", unit="img",
                                  disable=not progress, leave=False):
            rows += _score_one(b, predictor, source, samples, cache, i, shared, size, acc)
    finally:
        samples.close()
    summary = acc.compute()
    if "iou" in summary:  # per-class IoU of the semantic benchmark, one row per class
        summary.update({f"iou_{c.replace(' ', '_')}": v for c, v in zip(SEMANTIC_CLASSES, summary.pop("iou"))})
    return summary, acc.n_images, rows


def _score_one(b: Benchmark, predictor: _Predictor, source, samples, cache: Path, i: int, shared, size,
               acc) -> list[dict]:
    """Image ``i``: its prediction read from the cache or made (``samples[i]``, then cached), scored."""
    file = cache / f"{i:05d}.npz"
    stored = _cached(file, source.entries[i][0])
    if stored is not None:
        pred, gt, valid, sample_id = stored["pred"], stored["gt"], stored["valid"], str(stored["id"])
    else:
        sample = samples[i]
        gt, valid = ground_truth(sample, b.task)
        out = predictor(sample, b.task, (b.dataset, size, i), shared)
        pred = _hwc(_resize(out, gt.shape[:2], b.task)[0])
        sample_id = sample["id"]
        np.savez_compressed(file, pred=pred, gt=gt, valid=valid, id=np.array(sample_id),
                            rgb=(sample["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    result = acc.update(pred, gt, valid)[0]
    return [{"benchmark": b.name, "index": i, "id": sample_id, "metric": metric, "value": value_text(value)}
            for metric, value in (result or {}).items() if not isinstance(value, (list, tuple, dict, np.ndarray))]


def evaluate(model, benchmarks, out_dir, data_root, run: str = "run", model_name: str | None = None,
             resolution: dict | None = None, max_images: int | None = None, progress: bool = True,
             expect_kind: str | None = None, normals: str | None = None, silog: str = options.DEFAULTS["silog"],
             flow_scoring: str = options.DEFAULTS["flow_scoring"], fingerprint: str | None = None, device=None,
             dtype=None, prefetch: int = 2, seed: int | None = None) -> Path:
    """Evaluate ``model`` (a SingleStream/MultiStream, a checkpoint directory (``expect_kind`` checks
    its kind), a reference row ``"trivial"`` / ``("vae_ceiling", frozen)``, or a function
    ``(sample, task) -> prediction`` named by ``model_name``) on ``benchmarks``; returns ``out_dir``.

    ``resolution`` overrides the evaluation resolution per benchmark (the demo's miniatures are
    smaller than the real datasets); ``max_images`` limits each benchmark (for quick looks).
    ``normals`` is the convention of the model's normals (default: the model's own, else the
    release's ``"as_stored"``); ``silog`` and ``flow_scoring`` choose the protocol
    (``stablemtl.options``; the defaults are the release's). Cached predictions are reused only
    when they come from the same weights, data, resolution and protocol; a custom predictor's are
    reused only when it has a ``fingerprint``. ``device`` (None: the GPU when there is one, else the
    CPU; a device that does not exist is named) and ``dtype`` (None: the model's own; e.g.
    ``torch.bfloat16``) place a model (a caller's model is put back on its device afterwards, and
    cast on a copy); ``prefetch`` images are loaded ahead in a background thread (0: none).
    ``seed`` (the model's training seed; None for the seed-independent rows) goes into the ``seed``
    column and the cache folder ``predictions/<model>/seed<seed>/``: each seed's rows are kept apart.
    """

    options.check("silog", silog)
    options.check("flow_scoring", flow_scoring)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = seed_text(seed)
    predictor = _Predictor(model, model_name, expect_kind, fingerprint, normals, device, dtype)
    try:
        _evaluate(predictor, benchmarks, out_dir, data_root, run, resolution, max_images, progress, silog,
                  flow_scoring, prefetch, seed)
    finally:
        predictor.close()
    return out_dir


def _evaluate(predictor: _Predictor, benchmarks, out_dir: Path, data_root, run: str, resolution, max_images,
              progress: bool, silog: str, flow_scoring: str, prefetch: int, seed: str) -> None:
    """``evaluate`` with its predictor made: every benchmark predicted, scored and written (the rows of
    this run, model and seed on these benchmarks replace their earlier ones; every other row is kept)."""
    name = predictor.name
    benchmarks = [get_benchmark(b) if isinstance(b, str) else b for b in benchmarks]
    names = {b.name for b in benchmarks}
    mine = lambda r: (r["run"], r["model"], r["seed"]) == (run, name, seed) and r["benchmark"] in names  # noqa: E731
    metrics_csv = CsvRows(out_dir / METRICS_FILE, METRIC_FIELDS)
    samples_csv = CsvRows(out_dir / SAMPLES_FILE, SAMPLE_FIELDS)
    for message in edited_results(out_dir):  # the rows of other models are kept as they are now
        print(f"note: {message}; its other rows are kept and the new hash records them", flush=True)
    metric_rows = [r for r in read_or_set_aside(metrics_csv) if not mine(r)]
    sample_rows = [r for r in read_or_set_aside(samples_csv) if not mine(r)]
    size_of = lambda b: tuple((resolution or {}).get(b.name, b.resolution))  # noqa: E731
    timing = read_json_if_present(out_dir / TIMING_FILE)
    for b in benchmarks:
        if not predictor.predicts(b.task):
            raise ValueError(f"model {name!r} does not predict {b.task!r} (it has {predictor.tasks})")
        cls, size = SOURCES[b.dataset], size_of(b)
        # benchmarks on the same images (DIODE depth + normal, KITTI flow + scene flow, MID albedo +
        # shading) share one pipeline call per image: the multi stream's auxiliary pass is the same
        shared = [o.task for o in benchmarks[benchmarks.index(b):]
                  if o.dataset == b.dataset and size_of(o) == size and predictor.predicts(o.task)]
        source = cls(Path(data_root) / cls.root_hint, tasks=[b.task], resolution=size,
                     resize_targets=not (b.native_units and flow_scoring == "native"),
                     rescale_flow=not b.native_units, normals=predictor.normals)
        cache = out_dir / "predictions" / name / (f"seed{seed}" if seed else "") / b.name
        cache.mkdir(parents=True, exist_ok=True)
        _open_cache(cache, _cache_key(b, predictor.weights, source, size, predictor.normals, flow_scoring))
        n = len(source) if max_images is None else min(len(source), max_images)
        summary, n_images, rows = _score(b, predictor, source, cache, n, shared, size, silog, progress, prefetch)
        if predictor.timing["predicted"]:  # images read back from the cache keep the record of their prediction
            timing[f"{name}|{seed}|{b.name}"] = {"resolution": list(size), "device": str(predictor.device),
                                                 **predictor.timing, **devices.peak_memory(predictor.device)}
        sample_rows += [{"run": run, "model": name, "seed": seed, **r} for r in rows]
        for metric, value in summary.items():
            if not isinstance(value, (list, tuple, dict, np.ndarray)):
                metric_rows.append({"run": run, "model": name, "seed": seed, "benchmark": b.name,
                                    "dataset": b.dataset, "task": b.task, "metric": metric, "value": value_text(value),
                                    "higher_is_better": metrics.HIGHER_IS_BETTER.get(metric, metric.startswith("iou_")),
                                    "n_images": n_images})
    write_hashes(out_dir, {METRICS_FILE: metrics_csv.write(metric_rows), SAMPLES_FILE: samples_csv.write(sample_rows)})
    write_bytes(out_dir / TIMING_FILE, (json.dumps(timing, indent=1, sort_keys=True) + "\n").encode())


def evaluate_single_task(models: dict, out_dir, data_root, run: str = "run", seed: int | None = None,
                         **kwargs) -> Path:
    """The Delta_m reference: each single-task model (``{task: model or checkpoint}``) evaluated on
    its task's benchmarks, all stored as model ``single_task`` (of training seed ``seed``)."""
    for task, model in models.items():
        evaluate(model, benchmarks_of(task), out_dir, data_root, run=run, model_name="single_task",
                 expect_kind=None if not isinstance(model, (str, Path)) else "single_stream", seed=seed, **kwargs)
    return Path(out_dir)
