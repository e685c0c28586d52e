"""The first hour: a preset's name is its file's name, so a copied preset never shares (and rewrites) the
folders of the one it was copied from; the kit's licence and citation metadata agree with the package.
Fast: no stage runs (the folders are read from ``stages.context``)."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

import stablemtl
from stablemtl import stages
from stablemtl.cli import main
from stablemtl.guard import InputError
from stablemtl.presets import PRESET_DIR, available_presets, load_preset, preset_lines, preset_name

ROOT = Path(__file__).resolve().parents[1]
DEMO = PRESET_DIR / "demo.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the kit's root; no folder variable set."""
    monkeypatch.setenv("STABLEMTL_PROJECT", str(tmp_path / "project"))
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "DATA_DIR", "BASE_DIR", "PREPROCESSED_DIR", "BASE_CKPT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "project"


def copy_demo(path: Path, name_line: str | None) -> Path:
    """demo.yaml copied to ``path``, its ``name: demo`` line replaced by ``name_line`` (None: deleted)."""
    text = DEMO.read_text()
    assert "\nname: demo\n" in text
    path.write_text(text.replace("\nname: demo\n", f"\n{name_line}\n" if name_line else "\n"))
    return path


@pytest.mark.parametrize("name_line", [None, "name: my"])
def test_a_copied_demo_runs_as_a_preset_of_its_own_name(project, tmp_path, name_line):
    path = copy_demo(tmp_path / "my.yaml", name_line)
    study = stages.context(str(path))
    assert study.name == "my" and study.run_name == "my" and study.preset["name"] == "my"
    assert study.data_root == project.resolve() / "data" / "my"
    assert study.base_dir == project.resolve() / "outputs" / "my" / "base"
    assert study.output_dir == project.resolve() / "outputs" / "my"
    assert study.results_dir == project.resolve() / "results" / "my"
    assert load_preset(path)["name"] == preset_name(path) == "my"
    assert {k: v for k, v in load_preset(path).items() if k != "name"} == \
        {k: v for k, v in load_preset("demo").items() if k != "name"}  # the same preset otherwise
    assert stages.context(str(path), "trial").results_dir == project.resolve() / "results" / "trial"
    assert not project.exists()  # context only names the folders


def test_a_copy_that_keeps_the_demo_name_is_refused_naming_file_line_and_fix(project, tmp_path):
    path = copy_demo(tmp_path / "my.yaml", "name: demo")
    line = preset_lines(path)[("name",)]
    assert line == 2
    with pytest.raises(InputError) as err:
        stages.context(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}, line {line}: ")
    assert "'name: demo'" in message and "'my'" in message  # the field and the file's name
    assert "data/my" in message and "remove the 'name:' line" in message and "name: my" in message
    assert "rename the file to demo.yaml" not in message  # that would share the built-in demo's folders
    with pytest.raises(InputError, match="line 2"):
        load_preset(path)  # every reader of a preset file refuses it, not only the stages
    assert not project.exists()


def test_a_name_field_of_another_name_names_the_rename_too(tmp_path):
    path = copy_demo(tmp_path / "my.yaml", "name: study_b")
    with pytest.raises(InputError, match=r"rename the file to study_b\.yaml"):
        load_preset(path)


def test_the_cli_refuses_the_copy_before_writing_anything(project, tmp_path, capsys):
    path = copy_demo(tmp_path / "my.yaml", "name: demo")
    code = main(["run", "--preset", str(path), "--only", "01", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}, line 2" in err and "'name: demo'" in err and "Traceback" not in err
    assert not (project / "data").exists() and not (project / "results").exists()


def test_a_user_file_named_like_a_built_in_preset_is_refused(project, tmp_path):
    path = tmp_path / "demo.yaml"
    shutil.copy(DEMO, path)
    with pytest.raises(InputError, match=r"named like the built-in preset 'demo'.*rename the file"):
        stages.context(str(path))
    assert not project.exists()


def test_a_file_name_that_is_not_a_folder_name_is_refused(project, tmp_path):
    path = copy_demo(tmp_path / "my preset.yaml", None)
    with pytest.raises(InputError, match=r"preset name 'my preset'.*the file's name.*not a safe folder name"):
        stages.context(str(path))


@pytest.mark.parametrize("preset", available_presets())
def test_the_built_in_presets_are_named_by_their_files(project, monkeypatch, tmp_path, preset):
    assert yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())["name"] == preset  # the field agrees
    assert load_preset(preset)["name"] == preset_name(preset) == preset
    assert load_preset(str(PRESET_DIR / f"{preset}.yaml"))["name"] == preset  # by path too
    if preset == "paper":  # real data and SD2: their folders from the environment
        monkeypatch.setenv("PREPROCESSED_DIR", str(tmp_path / "preprocessed"))
        monkeypatch.setenv("BASE_DIR", str(tmp_path / "sd2"))
    study = stages.context(preset)
    assert study.name == study.run_name == preset
    assert study.results_dir == project.resolve() / "results" / preset
    assert study.output_dir == project.resolve() / "outputs" / preset
    if study.procedural:
        assert study.data_root == project.resolve() / "data" / preset
        assert study.base_dir == project.resolve() / "outputs" / preset / "base"


def test_the_built_in_presets_are_smoke_demo_and_paper():
    assert available_presets() == ["demo", "paper", "smoke"]


def test_a_dict_preset_keeps_its_name_or_is_custom(project):
    config = {k: v for k, v in load_preset("smoke").items() if k != "name"}
    assert preset_name(config) == "custom" and stages.context(config).name == "custom"
    assert stages.context({**config, "name": "mine"}).data_root == project.resolve() / "data" / "mine"


# --------------------------------------------------------------------------- licence and citation

def test_citation_cff_matches_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert str(cff["version"]) == stablemtl.__version__
    assert cff["license"] == pyproject["project"]["license"]["text"] == "Apache-2.0"
    assert cff["title"] == "stablemtl: a reproducible research kit for StableMTL"
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("StableMTL: Repurposing Latent Diffusion Models for Multi-Task Learning")
    assert [a["family-names"] for a in paper["authors"]] == ["Cao", "Lopes", "Charette"]
    assert paper["year"] == 2025 and "2506.08013" in paper["url"]


def test_license_is_the_apache_2_text_with_the_kits_copyright():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 the stablemtl authors" in text
    assert "[yyyy]" not in text and "[name of copyright owner]" not in text
