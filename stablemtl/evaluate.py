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

import csv
import hashlib
import json
import math
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stablemtl import devices, metrics, options
from stablemtl.tasks import FLOW_TASKS, get_task, to_grey

# bump when a change of the kit changes what a cached prediction holds (decoding, resizing, ground truth)
PROTOCOL_VERSION = 2
CACHE_FILE = "cache.json"
HASH_FILE = "results.sha256.json"  # {csv name: sha256 of the file as evaluate wrote it}
# {"model|seed|benchmark": images predicted (not read from the cache) and their seconds, device, peak memory}
TIMING_FILE = "evaluate_timing.json"
# what reading a truncated or corrupt .npz raises (zip, pickle-free numpy header, missing array)
_NPZ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError)

METRIC_FIELDS = ("run", "model", "seed", "benchmark", "dataset", "task", "metric", "value", "higher_is_better",
                 "n_images")
SAMPLE_FIELDS = ("run", "model", "seed", "benchmark", "index", "id", "metric", "value")


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


def _accumulator(b: Benchmark, silog: str):
    return {"depth": lambda: metrics.DepthAccumulator(depth_range=b.depth_range, silog=silog),
            "normal": metrics.NormalAccumulator, "semantic": metrics.SemanticConfusion,
            "optical_flow": metrics.FlowAccumulator, "scene_flow": metrics.SceneFlowAccumulator,
            "albedo": metrics.IntrinsicAccumulator, "shading": metrics.IntrinsicAccumulator}[b.task]()


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


def trivial_prediction(sample: dict, task: str, majority_class: int = 0, normals: str = "as_stored") -> torch.Tensor:
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
    from stablemtl.model.base import vae_roundtrip

    t = get_task(task)
    target, _ = t.encode(sample[task][None], sample[f"{task}_valid"][None])
    return t.decode(vae_roundtrip(frozen.vae, target))


class ResultsFileError(ValueError):
    """A results CSV exists but cannot be read as one (wrong header, a value that is not a number)."""


class _CsvRows:
    def __init__(self, path: Path, fields):
        self.path, self.fields = path, fields

    def read(self) -> list[dict]:
        """The rows (keys in the order of ``fields``); a ``ResultsFileError`` naming the file, the line and
        the value when it is not one of the kit's CSVs (other header) or a ``value`` is not a number. A file
        of the header before the ``seed`` column is read with an empty seed: its rows stay valid."""
        if not self.path.is_file():
            return []
        before_seed = [f for f in self.fields if f != "seed"]
        try:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or list(reader.fieldnames) not in (list(self.fields), before_seed):
                    raise ResultsFileError(f"{self.path}: expected the header {','.join(self.fields)} (or the same "
                                           f"without seed), got {','.join(reader.fieldnames or ['(empty file)'])}")
                rows, header = list(reader), reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as err:
            raise ResultsFileError(f"{self.path}: not a readable CSV ({err})") from None
        for line, row in enumerate(rows, 2):
            if None in row or any(v is None for v in row.values()):
                raise ResultsFileError(f"{self.path}: line {line} has {len(row) - (None in row)} field(s) and "
                                       f"{len(row.get(None) or [])} extra; expected {len(header)}")
            try:
                float(row["value"])
            except ValueError:
                raise ResultsFileError(f"{self.path}: line {line}: value {row['value']!r} is not a number "
                                       f"(write nan for a missing one)") from None
        return [{f: row.get(f, "") for f in self.fields} for row in rows]

    def write(self, rows: list[dict]) -> str:
        """Write the rows atomically; returns the file's sha256."""
        tmp = self.path.with_suffix(".csv.partial")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)
        return file_sha256(self.path)


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results_hashes(results_dir) -> dict[str, str]:
    """``{csv name: sha256}`` as evaluate recorded them in ``results.sha256.json`` (``{}`` when absent,
    e.g. results written before the kit recorded hashes; a corrupt record is named)."""
    from stablemtl.data.formats import read_json_if_present

    return read_json_if_present(Path(results_dir) / HASH_FILE)


def edited_results(results_dir, names=("metrics.csv", "per_sample.csv")) -> list[str]:
    """One message per results CSV of ``results_dir`` whose sha256 differs from the one evaluate
    recorded: edited by hand (or by another tool) since it was written. Files without a record pass."""
    from stablemtl.data.formats import FormatError

    results_dir = Path(results_dir)
    try:
        recorded, found = results_hashes(results_dir), []
    except FormatError as err:
        return [f"{err}: the results cannot be checked against the hashes evaluate recorded"]
    for name in names:
        path = results_dir / name
        if name in recorded and path.is_file() and file_sha256(path) != recorded[name]:
            found.append(f"{path} was changed after evaluate wrote it (its sha256 differs from the one recorded "
                         f"in {results_dir / HASH_FILE}): the numbers below come from the edited file")
    return found


def _value(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _cache_key(b: Benchmark, weights: str | None, source, size, normals: str, flow_scoring: str) -> dict:
    """What the cached predictions of a benchmark depend on; ``None`` weights: nothing to compare."""
    return {"weights": weights, "data": str(source.root.resolve()), "split": str(getattr(source, "split_file", "")),
            "resolution": list(size), "normals": normals, "protocol": PROTOCOL_VERSION,
            "flow_scoring": flow_scoring if b.native_units else None}


def _open_cache(cache: Path, key: dict) -> None:
    """Keep the cached predictions of ``cache`` only when they were made under ``key``; a record that is
    not JSON is set aside (its predictions cannot be trusted, so they are predicted anew)."""
    from stablemtl.data.formats import set_aside_corrupt

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
        from stablemtl.model.streams import load_model, module_fingerprint

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
        self.normals = options.check("normals", normals or "as_stored")
        self.name = model_name or self.kind

    def _place(self, model, dtype) -> None:
        """The pipeline of ``model``, in ``dtype`` (a caller's model: on a copy), moved to the device once."""
        import copy

        from stablemtl.model.pipeline import StableMTLPipeline
        from stablemtl.model.streams import model_fingerprint

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
    from stablemtl.data.formats import set_aside_corrupt

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
    from tqdm.auto import tqdm

    acc = _accumulator(b, silog)
    rows = []
    todo = [i for i in range(n) if not _is_cached(cache / f"{i:05d}.npz", source.entries[i][0])]
    samples = _Prefetch(source, todo, prefetch)
    predictor.timing = {"predicted": 0, "seconds": 0.0}
    try:
        for i in tqdm(range(n), desc=f"{predictor.name} / {b.name}", disable=not progress, leave=False):
            rows += _score_one(b, predictor, source, samples, cache, i, shared, size, acc)
    finally:
        samples.close()
    summary = acc.compute()
    if "iou" in summary:  # per-class IoU of the semantic benchmark, one row per class
        from stablemtl.tasks import SEMANTIC_CLASSES

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
    return [{"benchmark": b.name, "index": i, "id": sample_id, "metric": metric, "value": _value(value)}
            for metric, value in (result or {}).items() if not isinstance(value, (list, tuple, dict, np.ndarray))]


def _read_or_set_aside(table: _CsvRows) -> list[dict]:
    """The rows of a results CSV evaluate merges into; one that cannot be read is set aside with a message
    (its rows are recomputed when their models are evaluated again) instead of failing every rerun."""
    from stablemtl.data.formats import set_aside_corrupt

    try:
        return table.read()
    except ResultsFileError as err:
        set_aside_corrupt(table.path, str(err).removeprefix(f"{table.path}: "))
        return []


def evaluate(model, benchmarks, out_dir, data_root, run: str = "run", model_name: str | None = None,
             resolution: dict | None = None, max_images: int | None = None, progress: bool = True,
             expect_kind: str | None = None, normals: str | None = None, silog: str = "x100",
             flow_scoring: str = "eval_resolution", fingerprint: str | None = None, device=None, dtype=None,
             prefetch: int = 2, seed: int | None = None) -> Path:
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
    from stablemtl.data.sources import SOURCES

    name = predictor.name
    benchmarks = [get_benchmark(b) if isinstance(b, str) else b for b in benchmarks]
    names = {b.name for b in benchmarks}
    mine = lambda r: (r["run"], r["model"], r["seed"]) == (run, name, seed) and r["benchmark"] in names  # noqa: E731
    metrics_csv = _CsvRows(out_dir / "metrics.csv", METRIC_FIELDS)
    samples_csv = _CsvRows(out_dir / "per_sample.csv", SAMPLE_FIELDS)
    for message in edited_results(out_dir):  # the rows of other models are kept as they are now
        print(f"note: {message}; its other rows are kept and the new hash records them", flush=True)
    metric_rows = [r for r in _read_or_set_aside(metrics_csv) if not mine(r)]
    sample_rows = [r for r in _read_or_set_aside(samples_csv) if not mine(r)]
    size_of = lambda b: tuple((resolution or {}).get(b.name, b.resolution))  # noqa: E731
    from stablemtl.data.formats import _write_bytes, read_json_if_present

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
                                    "dataset": b.dataset, "task": b.task, "metric": metric, "value": _value(value),
                                    "higher_is_better": metrics.HIGHER_IS_BETTER.get(metric, metric.startswith("iou_")),
                                    "n_images": n_images})
    hashes = {"metrics.csv": metrics_csv.write(metric_rows), "per_sample.csv": samples_csv.write(sample_rows)}
    _write_bytes(out_dir / HASH_FILE, (json.dumps(hashes, indent=1, sort_keys=True) + "\n").encode())
    _write_bytes(out_dir / TIMING_FILE, (json.dumps(timing, indent=1, sort_keys=True) + "\n").encode())


def drop_stale_rows(out_dir, run: str, expected: dict[str, set[str]], log=print) -> int:
    """Remove the rows of ``run`` whose model is a key of ``expected`` but whose seed is not in its set
    (a seed the run no longer trains, or rows written before the seed column); both CSVs and their
    hashes are rewritten. Returns the number of metric rows removed."""
    from stablemtl.data.formats import _write_bytes

    out_dir = Path(out_dir)
    stale = lambda r: r["run"] == run and r["model"] in expected and r["seed"] not in expected[r["model"]]  # noqa: E731
    tables = [_CsvRows(out_dir / "metrics.csv", METRIC_FIELDS), _CsvRows(out_dir / "per_sample.csv", SAMPLE_FIELDS)]
    rows = [_read_or_set_aside(t) for t in tables]
    dropped = sorted({(r["model"], r["seed"] or "none") for r in rows[0] if stale(r)})
    if not dropped:
        return 0
    log(f"note: {out_dir / 'metrics.csv'}: removed the rows of " + ", ".join(f"{m} (seed {s})" for m, s in dropped)
        + f" of run {run!r}: this evaluation has no such model and seed")
    hashes = {t.path.name: t.write([r for r in table_rows if not stale(r)]) for t, table_rows in zip(tables, rows)}
    _write_bytes(out_dir / HASH_FILE, (json.dumps(hashes, indent=1, sort_keys=True) + "\n").encode())
    return sum(stale(r) for r in rows[0])


def benchmarks_of(task: str) -> list[str]:
    return [name for name, b in BENCHMARKS.items() if b.task == task]


def evaluate_single_task(models: dict, out_dir, data_root, run: str = "run", seed: int | None = None,
                         **kwargs) -> Path:
    """The Delta_m reference: each single-task model (``{task: model or checkpoint}``) evaluated on
    its task's benchmarks, all stored as model ``single_task`` (of training seed ``seed``)."""
    for task, model in models.items():
        evaluate(model, benchmarks_of(task), out_dir, data_root, run=run, model_name="single_task",
                 expect_kind=None if not isinstance(model, (str, Path)) else "single_stream", seed=seed, **kwargs)
    return Path(out_dir)


def seed_text(seed) -> str:
    """The ``seed`` column's text of a training seed: ``""`` for None (a seed-independent row)."""
    if seed is None or seed == "":
        return ""
    if not isinstance(seed, bool) and isinstance(seed, (int, np.integer, str)) and re.fullmatch(r"-?\d+", str(seed)):
        return str(int(seed))
    raise ValueError(f"seed {seed!r} is not an integer (or None for a seed-independent row)")


def prediction_folder(results_dir, model: str) -> tuple[Path, str]:
    """The folder of ``model``'s cached predictions that readers show, holding ``<benchmark>/NNNNN.npz``,
    and its seed: the first (lowest) seed's ``predictions/<model>/seed<seed>`` when the model was
    evaluated with seeds, else ``predictions/<model>`` and ``""``."""
    folder = Path(results_dir) / "predictions" / model
    seeds = sorted(int(p.name[4:]) for p in folder.glob("seed*") if p.is_dir() and re.fullmatch(r"seed-?\d+", p.name))
    return (folder / f"seed{seeds[0]}", str(seeds[0])) if seeds else (folder, "")


# the rows of a run's evaluation (stage 05): the references, then the trained models of stage 03 and 04
MODELS = ("trivial", "vae_ceiling", "single_task", "single_stream_random", "single_stream", "multi_stream")


def trained_models(study, seeds: list[int]) -> dict[tuple[str, int], Path]:
    """(model row, seed) -> model folder, for every model of ``MODELS`` the run has trained for ``seeds``
    (a single-task baseline ``single_task_<task>`` is a ``single_task`` row)."""
    from stablemtl.model.streams import MODEL_FILE
    from stablemtl.tasks import TASK_NAMES

    found = {}
    for seed in seeds:
        for name in MODELS[3:]:
            if (study.model_dir(name, seed) / MODEL_FILE).is_file():
                found[(name, seed)] = study.model_dir(name, seed)
        for task in TASK_NAMES:
            folder = study.model_dir(f"single_task_{task}", seed)
            if (folder / MODEL_FILE).is_file():
                found[(f"single_task_{task}", seed)] = folder
    return found


def evaluate_run(study, models=None, benchmarks=None, max_images=None, progress: bool = True,
                 silog: str | None = None, flow_scoring: str | None = None, device=None, dtype=None,
                 seeds: int | None = None, seed: int | None = None) -> Path:
    """Stage 05: evaluate ``models`` (names of ``MODELS``; None: the reference rows and every model the
    run trained) for every seed of ``study.seeds(seeds, seed)`` on its benchmarks into ``results/<run>``.

    ``trivial`` and ``vae_ceiling`` (the ground truth through the frozen VAE: the best a latent
    prediction can be) do not depend on a seed; ``single_task`` gathers the single-task baselines.
    A model trained on fewer tasks meets only their benchmarks; ``max_images`` limits each benchmark;
    ``silog`` and ``flow_scoring`` (None: the release's) choose the protocol options of
    ``stablemtl.options``. Cached predictions are reused only when they come from the same weights,
    data and protocol (``evaluate``). ``device`` (None: the GPU when there is one) and ``dtype`` (e.g.
    ``torch.bfloat16``; None: float32) as in ``evaluate``.
    """
    from stablemtl.model.base import load_base
    from stablemtl.model.streams import MODEL_FILE
    from stablemtl.paths import StageError, require

    unknown = set(models or ()) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {MODELS}")
    require(study, "01")
    seed_list = study.seeds(seeds, seed)
    trained = trained_models(study, seed_list)
    row = lambda folder: "single_task" if folder.startswith("single_task_") else folder  # noqa: E731
    if models is None:
        models = [m for m in MODELS[:2] if study.procedural or m == "trivial"]
        models += [m for m in MODELS[2:] if any(row(name) == m for name, _ in trained)]
    for name in models:
        missing = [s for s in seed_list if name in MODELS[3:] and (name, s) not in trained]
        if missing:
            raise StageError(f"{study.model_dir(name, missing[0])} is not a trained model: run notebooks 03 and 04 "
                             f"(or `stablemtl run --only 03,04`) with the same preset, run name and seeds first")
    benchmarks = [get_benchmark(b).name for b in (benchmarks or BENCHMARKS)]
    resolution = (study.preset.get("evaluate") or {}).get("resolution")
    common = dict(resolution=resolution, max_images=max_images, progress=progress, device=device, dtype=dtype,
                  **{k: v for k, v in (("silog", silog), ("flow_scoring", flow_scoring)) if v is not None})
    study.results_dir.mkdir(parents=True, exist_ok=True)
    expected = {name: {""} if name in MODELS[:2] else
                {seed_text(s) for folder, s in trained if row(folder) == name} for name in models}
    drop_stale_rows(study.results_dir, study.run, expected)
    for name in models:
        if name in MODELS[:2]:
            source = "trivial" if name == "trivial" else ("vae_ceiling", load_base(study.base_dir))
            evaluate(source, benchmarks, study.results_dir, study.data_root, run=study.run, model_name=name,
                     **common)
            continue
        for (folder_name, seed_value), folder in trained.items():
            if row(folder_name) != name:
                continue
            tasks = json.loads((folder / MODEL_FILE).read_text()).get("tasks") or []
            chosen = [b for b in benchmarks if BENCHMARKS[b].task in tasks]
            if not chosen:
                print(f"{folder_name}: trained on {tasks}, none of the benchmarks {benchmarks}; skipped")
                continue
            evaluate(folder, chosen, study.results_dir, study.data_root, run=study.run, model_name=name,
                     seed=seed_value, expect_kind="multi_stream" if name == "multi_stream" else "single_stream",
                     **common)
    return study.results_dir


def read_metrics(results_dir) -> list[dict]:
    """The rows of ``<results_dir>/metrics.csv``; a clear error when there is none or it cannot be read
    (``ResultsFileError`` naming the file, the line and the value)."""
    path = Path(results_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics in this results folder (run stablemtl.evaluate.evaluate first)")
    return _CsvRows(path, METRIC_FIELDS).read()
