"""The report of ``stablemtl rehearse``: the figures of the rehearsal's run read from its files
(``collect_figures``: training seconds per step, evaluation seconds per image, the benchmarks scored) and
``rehearsal.md`` (``format_report``: per stage the wall time, peak memory, disk written and status).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from stablemtl.benchmarks import BENCHMARKS
from stablemtl.paths import KINDS, METRICS_FILE, STATS_FILE, TRAIN_LOG
from stablemtl.results import TIMING_FILE, read_metrics
from stablemtl.watch import GIB, folder_bytes


def collect_figures(outputs: Path, results: Path) -> dict:
    """Training s/step and s/micro-batch (``train_log.csv``), evaluation s/image (``evaluate_timing.json``)
    and the benchmarks scored (``metrics.csv``) of the rehearsal's run."""

    training = {}
    for kind in KINDS:
        log = outputs / kind / TRAIN_LOG
        if not log.is_file():
            continue
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
        step_s = [float(r["step_s"]) for r in rows]
        data_s = [float(r["data_s"]) for r in rows]
        config = outputs / kind / "checkpoint" / "latest" / "state.json"
        micro = None
        if config.is_file():
            c = json.loads(config.read_text())["config"]
            micro = c["effective_batch"] // c["batch_per_device"]
        latest = outputs / kind / "checkpoint" / "latest"
        stats = outputs / kind / STATS_FILE
        training[kind] = {"steps": len(rows), "s_per_step": round(sum(step_s) / len(step_s), 2) if rows else None,
                          "first_step_s": step_s[0] if rows else None,
                          "micro_batches_per_step": micro,
                          "s_per_micro_batch": round(sum(step_s) / len(step_s) / micro, 3) if rows and micro else None,
                          "data_wait_share": round(sum(data_s) / max(1e-9, sum(step_s)), 3) if rows else None,
                          "checkpoint_gib": round(folder_bytes(latest) / GIB, 3) if latest.is_dir() else None,
                          **(json.loads(stats.read_text()) if stats.is_file() else {})}
    evaluation, scored = {}, {}
    timing = results / TIMING_FILE
    if timing.is_file():
        for key, entry in json.loads(timing.read_text()).items():
            model = key.split("|")[0]
            agg = evaluation.setdefault(model, {"images": 0, "seconds": 0.0, "cuda_peak_gib": None})
            agg["images"] += entry["predicted"]
            agg["seconds"] += entry["seconds"]
            if entry.get("cuda_peak_gib") is not None:
                agg["cuda_peak_gib"] = max(agg["cuda_peak_gib"] or 0, entry["cuda_peak_gib"])
        for agg in evaluation.values():
            agg["s_per_image"] = round(agg["seconds"] / agg["images"], 3) if agg["images"] else None
            agg["seconds"] = round(agg["seconds"], 2)
    if (results / METRICS_FILE).is_file():
        for row in read_metrics(results):
            b = BENCHMARKS.get(row["benchmark"])
            if b is None or row["metric"] != b.headline:
                continue
            entry = scored.setdefault(row["benchmark"], {"resolution": list(b.resolution), "metric": row["metric"],
                                                         "models": {}})
            entry["models"][row["model"]] = {"value": float(row["value"]), "n_images": int(row["n_images"])}
    return {"training": training, "evaluation": evaluation, "benchmarks": scored}


def format_report(report: dict) -> str:
    """``rehearsal.md``: the settings, the machine, one row per stage, then the training, evaluation, prediction
    and benchmark figures the report holds."""
    s = report.get("settings", {})
    lines = ["# Rehearsal of the paper preset", "",
             f"`{report.get('command') or 'stablemtl rehearse'}`: width {s.get('width')} of SD2, {s.get('steps')} "
             f"step(s) per stream, {s.get('images')} image(s) per dataset, effective batch "
             f"{s.get('effective_batch')} in micro-batches of {s.get('batch_per_device')}, device {s.get('device')}, "
             f"raw frames rendered at 1/{s.get('render_scale')} and upsampled to the real sizes.", "",
             f"Machine: {report.get('machine', {}).get('cpus')} CPUs, {report.get('machine', {}).get('memory_gib')} "
             f"GiB, {report.get('machine', {}).get('device_name')}; torch {report.get('machine', {}).get('torch')}.", "",
             "| stage | status | wall s | peak RSS GiB | disk written GiB | error |", "|---|---|---|---|---|---|"]
    for name, r in report.get("stages", {}).items():
        if name == "notes":
            continue
        error = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:800]
        disk = r.get("disk_written_gib")
        lines.append(f"| {name} | {r.get('status')}{' (earlier call)' if r.get('kept') else ''} | {r.get('wall_s')} | "
                     f"{r.get('peak_rss_gib')} | {max(0.0, disk) if disk is not None else None} | {error} |")
    for note in report.get("stages", {}).get("notes", []):
        lines += ["", f"Note: {note}"]
    if report.get("training"):
        lines += ["", "| training | steps | s/step | micro-batches per step | s/micro-batch | data wait share | "
                      "checkpoint GiB | peak CUDA GiB |", "|---|---|---|---|---|---|---|---|"]
        for kind, t in report["training"].items():
            lines.append(f"| {kind} | {t.get('steps')} | {t.get('s_per_step')} | {t.get('micro_batches_per_step')} | "
                         f"{t.get('s_per_micro_batch')} | {t.get('data_wait_share')} | {t.get('checkpoint_gib')} | "
                         f"{t.get('cuda_peak_gib')} |")
    if report.get("evaluation"):
        lines += ["", "| evaluation | images predicted | s/image | peak CUDA GiB |", "|---|---|---|---|"]
        for model, e in report["evaluation"].items():
            if not e["images"]:
                continue  # the trivial row: no model call to time
            lines.append(f"| {model} | {e['images']} | {e['s_per_image']} | {e['cuda_peak_gib']} |")
    predictions = {k: v for k, v in report.get("stages", {}).items() if k.startswith("predict ") and "s_per_image" in v}
    if predictions:
        lines += ["", "| prediction | size | tasks | s/image | peak RSS GiB | peak CUDA GiB |", "|---|---|---|---|---|---|"]
        for name, p in predictions.items():
            lines.append(f"| {name.removeprefix('predict ')} | {p['size'][0]}x{p['size'][1]} | {len(p['tasks'])} | "
                         f"{p['s_per_image']} | {p['peak_rss_gib']} | {p.get('cuda_peak_gib')} |")
    if report.get("benchmarks"):
        lines += ["", "| benchmark | resolution | metric | " + " | ".join(_models(report)) + " |",
                  "|---|---|---|" + "---|" * len(_models(report))]
        for name, b in report["benchmarks"].items():
            cells = [f"{b['models'][m]['value']:.4g} (n={b['models'][m]['n_images']})" if m in b["models"] else "-"
                     for m in _models(report)]
            lines.append(f"| {name} | {b['resolution'][0]}x{b['resolution'][1]} | {b['metric']} | " + " | ".join(cells) + " |")
    lines += ["", f"Total {report.get('wall_s')} s; {'every stage done' if report.get('ok') else 'NOT every stage done'}."
              " Random weights: the numbers check the code path, not the method."]
    return "\n".join(lines) + "\n"


def _models(report: dict) -> list[str]:
    names = []
    for b in report.get("benchmarks", {}).values():
        names += [m for m in b["models"] if m not in names]
    return names
