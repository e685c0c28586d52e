"""The bars of a notebook's kernel reach the ``stablemtl run`` terminal (``stablemtl.progress``)."""

from __future__ import annotations

import io
import json

import pytest

from stablemtl import progress


@pytest.fixture
def report_file(tmp_path, monkeypatch):
    path = tmp_path / "bars.jsonl"
    path.touch()
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # every update reported
    return path


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_bar_reports_its_steps_postfix_and_close(report_file):
    bar = progress.bar(total=5, initial=2, desc="train single_stream", unit="step", file=io.StringIO())
    for k in range(3):
        bar.update()
        bar.set_postfix(loss=f"{0.5 / (k + 1):.4f}")
    bar.close()
    bar.close()  # a second close reports nothing more
    seen = events(report_file)
    assert len({e["id"] for e in seen}) == 1
    assert seen[0] | {"id": None} == {"id": None, "desc": "train single_stream", "n": 2, "total": 5, "unit": "step",
                                      "postfix": "", "leave": True, "closed": False}
    assert [e["n"] for e in seen if not e["closed"]][-1] == 5 and seen[-1]["postfix"] == "loss=0.1667"
    assert [e["closed"] for e in seen].count(True) == 1 and seen[-1]["closed"]


def test_an_iterated_bar_reports_its_last_count(report_file):
    assert list(progress.bar(range(7), desc="eval", leave=False, file=io.StringIO())) == list(range(7))
    last = events(report_file)[-1]
    assert last["n"] == 7 and last["closed"] and last["leave"] is False


def test_without_the_variable_or_when_disabled_nothing_is_reported(report_file, monkeypatch):
    progress.bar(total=3, disable=True).update()
    assert report_file.read_text() == ""
    monkeypatch.delenv(progress.ENV)
    bar = progress.bar(total=3, file=io.StringIO())
    assert not hasattr(bar, "_report")
    bar.close()


def test_the_relay_draws_the_reported_bars_and_waits_for_a_whole_line(tmp_path, monkeypatch):
    path = tmp_path / "bars.jsonl"
    path.write_text("")
    relay = progress.Relay(path)
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", lambda **kw: tqdm.std.tqdm(**kw, file=io.StringIO()))
    first = {"id": "a", "desc": "train multi_stream", "n": 0, "total": 130, "unit": "step", "postfix": "",
             "leave": True, "closed": False}
    with open(path, "a") as f:
        f.write(json.dumps(first) + "\n" + json.dumps(dict(first, n=40, postfix="loss=0.12"))[:-5])  # half a line
    relay.poll()
    assert relay.bars["a"].n == 0 and relay.bars["a"].total == 130 and relay.bars["a"].desc.strip() == first["desc"]
    with open(path, "a") as f:
        f.write(json.dumps(dict(first, n=40, postfix="loss=0.12"))[-5:] + "\n" + "not json\n")
    relay.poll()
    bar = relay.bars["a"]
    assert bar.n == 40 and bar.postfix == "loss=0.12"
    with open(path, "a") as f:
        f.write(json.dumps(dict(first, n=130, closed=True)) + "\n")
        f.write(json.dumps(dict(first, id="b", closed=True, leave=False)) + "\n")  # over before it was seen
    relay.poll()
    assert relay.bars == {} and bar.n == 130
