"""Your run and the committed one (``stablemtl.reproduction``): the verdicts, measured on the committed
demo reference itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stablemtl import reproduction as R
from stablemtl.results import METRIC_FIELDS, CsvRows, read_metrics

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "demo"


def _first_seed(scale=None):
    """The committed run's rows of seed 2024 and the seed-independent rows, as a run of one seed would
    write them; ``scale(row) -> factor`` changes values."""
    rows = [dict(r) for r in read_metrics(REFERENCE) if r["seed"] in ("", "2024")]
    for r in rows:
        r["run"] = "mine"
        if scale is not None:
            r["value"] = repr(float(r["value"]) * scale(r))
    return rows


def test_the_committed_rows_reproduce_themselves_exactly():
    records = R.compare(_first_seed(), read_metrics(REFERENCE))
    assert len(records) == 6 * 8 and {r["verdict"] for r in records} == {"identical"}
    assert R.verdict(records).startswith("reproduced exactly: all 48")


def test_rounding_is_equal_within_the_tolerance_and_a_real_change_is_named():
    rounded = R.compare(_first_seed(lambda r: 1 + 3e-5), read_metrics(REFERENCE))
    assert {r["verdict"] for r in rounded} == {R.VERDICTS[1]}
    assert R.verdict(rounded).startswith("reproduced: 0 of 48 headline values identical")
    # the multi stream's KITTI scene flow 1 % worse: not rounding, but inside its three seeds' spread
    target = ("multi_stream", "kitti_scene_flow")
    shifted = R.compare(_first_seed(lambda r: 1.01 if (r["model"], r["benchmark"]) == target else 1.0),
                        read_metrics(REFERENCE))
    (record,) = [r for r in shifted if (r["model"], r["benchmark"]) == target]
    assert record["verdict"] == "within the seed spread" and record["n"] == 3
    assert R.verdict(shifted).startswith("reproduced within the seed spread: 47 of 48")
    # three times worse: outside, and the verdict names it
    far = R.compare(_first_seed(lambda r: 3.0 if (r["model"], r["benchmark"]) == target else 1.0),
                    read_metrics(REFERENCE))
    text = R.verdict(far)
    assert text.startswith("NOT reproduced: 1 of 48") and "multi_stream on kitti_scene_flow, seed 2024" in text


def test_only_the_committed_configuration_is_compared():
    preset = json.loads((REFERENCE / "manifest.json").read_text())["preset"]
    assert R.configuration_difference(preset, {"seeds": 3, "single_task": True}, REFERENCE) is None
    assert R.configuration_difference(preset, {"iterations": 3}, REFERENCE) == "it sets iterations (-p)"
    other = dict(preset, train=dict(preset["train"], lr=1.0))
    assert R.configuration_difference(other, {}, REFERENCE) == "its preset differs from the committed run's in train"


def test_a_run_is_compared_after_it_finishes_and_the_report_is_written(tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(REFERENCE, project / "results" / "reference" / "demo")
    monkeypatch.setenv("STABLEMTL_PROJECT", str(project))
    mine = tmp_path / "mine"
    mine.mkdir()
    CsvRows(mine / "metrics.csv", METRIC_FIELDS).write(_first_seed())
    preset = json.loads((REFERENCE / "manifest.json").read_text())["preset"]
    line = R.compare_with_reference(mine, "mine", preset, {})
    assert line.startswith("reproduced exactly: all 48") and str(mine / R.REPORT_FILE) in line
    report = (mine / R.REPORT_FILE).read_text()
    assert report.count("| identical |") == 48 and "| multi_stream | kitti_scene_flow | epe3d | 2024 |" in report
    assert R.compare_with_reference(mine, "mine", dict(preset, name="smoke"), {}) is None  # no reference
    assert R.compare_with_reference(project / "results" / "reference" / "demo", "demo", preset, {}) is None


def test_no_run_writes_into_the_reference(monkeypatch, tmp_path):
    """A run's folder is results/<run name>, and a run name is one folder name: never results/reference/."""
    from stablemtl.guard import InputError, check_name
    from stablemtl.stages import context

    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path))
    assert context("demo").results_dir == tmp_path / "results" / "demo"
    with pytest.raises(InputError):
        check_name("reference/demo", "run name")
    with pytest.raises(InputError, match="run name 'reference' is reserved"):
        context("demo", run_name="reference")
