"""The committed demo run: its tables and target check follow from its metrics.csv, and it meets the
demo's targets (both models beat the trivial baseline on every headline metric; multi-stream is not
worse than single-stream on average)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from stablemtl.paths import METRICS_FILE, MODELS
from stablemtl.report import format_target_check, target_check, write_report
from stablemtl.results import HASH_FILE

DEMO = Path(__file__).resolve().parents[1] / "results" / "reference" / "demo"


def regenerate(demo: Path, folder: Path) -> dict[str, Path]:
    """The tables and ``summary.md`` of the results folder ``demo`` made anew in ``folder`` from its
    ``metrics.csv`` (and the hashes evaluate recorded), under the heading of its ``summary.md``; no figures."""
    if not (demo / METRICS_FILE).is_file():
        pytest.fail(f"{demo}/{METRICS_FILE} is missing: the demo run's results are committed (stablemtl run)")
    for name in (METRICS_FILE, HASH_FILE):
        if (demo / name).is_file():
            shutil.copy(demo / name, folder / name)
    title = (demo / "summary.md").read_text().splitlines()[0].removeprefix("# ")
    return write_report(folder, run="demo", title=title, figures=False)


def test_committed_demo_tables_regenerate_byte_for_byte(tmp_path):
    written = regenerate(DEMO, tmp_path)
    committed = sorted(p.name for p in (DEMO / "tables").iterdir())
    assert committed == sorted(name for name in written if name != "summary.md")
    for name in committed + ["summary.md"]:
        expected = DEMO / ("summary.md" if name == "summary.md" else f"tables/{name}")
        assert written[name].read_bytes() == expected.read_bytes(), f"{expected} differs from the regenerated {name}"


def test_committed_summary_follows_from_the_csv_and_the_readme_quotes_it():
    with open(DEMO / METRICS_FILE, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == "demo"]
    table, passed = target_check(rows)
    text = format_target_check(table, passed)
    assert text in (DEMO / "summary.md").read_text()
    assert {r["model"] for r in rows} >= set(MODELS)
    assert {r["seed"] for r in rows if r["model"] == "multi_stream"} == {"2024", "2025", "2026"}
    # the README shows the committed target check verbatim: what it says the demo meets, it meets
    readme = (DEMO.parents[2] / "README.md").read_text()
    assert "```\n" + text + "\n```" in readme


def test_committed_figures_exist():
    for name in ("training_curves.png", "qualitative.png"):
        assert (DEMO / "figures" / name).stat().st_size > 10_000, name
