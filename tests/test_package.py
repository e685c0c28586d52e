"""The installable package: version, cheap import, command line, README <-> CI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import stablemtl

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "cv2", "matplotlib", "pandas", "h5py", "OpenEXR")


def _loaded_after(statement: str) -> list[str]:
    probe = f"{statement}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_version_is_a_release_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+", stablemtl.__version__)


def test_package_import_loads_no_heavy_module():
    # the import-time budget (< 2 s) is measured in benchmarks/bench_import.py; what keeps it
    # small is that neither the package nor its numpy-only modules import these
    assert _loaded_after("import stablemtl") == []
    assert _loaded_after("import stablemtl.metrics, stablemtl.data.formats") == []


@pytest.mark.slow
def test_console_script_runs_and_checks_the_tasks(tmp_path):
    script = Path(sys.executable).with_name("stablemtl")
    out = "".join(subprocess.run([str(script), command, "--preset", "smoke", "--out", str(folder), "--quiet"],
                                 check=True, capture_output=True, text=True).stdout
                  for command, folder in (("data", tmp_path), ("base", tmp_path / "base")))
    out += subprocess.run([str(script), "check"], check=True, capture_output=True, text=True).stdout  # status 0
    assert (tmp_path / "base/unet/diffusion_pytorch_model.safetensors").is_file()
    assert "VAE ceiling" in out
    assert (tmp_path / "kitti/flow_2015/training/flow_occ/000000_10.png").is_file()
    assert re.search(r"^mid\s+MIDIntrinsics\s+4\s+albedo, shading", out, re.M)
    for name in ("albedo", "shading", "depth", "normal", "semantic", "optical_flow", "scene_flow"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name) and "round trip" in line)
        error = float(re.search(r"round trip: ([0-9.e+-]+)", line).group(1))
        assert error < 1e-3, line
    bad = subprocess.run([str(script), "fly"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'fly'" in bad.stderr


def test_console_script_prints_its_version():
    script = Path(sys.executable).with_name("stablemtl")
    done = subprocess.run([str(script), "--version"], check=True, capture_output=True, text=True)
    assert done.stdout == f"stablemtl {stablemtl.__version__}\n"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(\./setup\.sh.*?)\s{2,}#", readme, flags=re.M)
    assert len(commands) == 2, commands  # exactly two commands: main job and tests
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_tiny_on_the_cpu():
    """``benchmarks/bench_gpu.py --tiny``: the paper-scale measures on the tiny components, one JSON line."""
    import json

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny"], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["tiny"] is True
    for kind in ("single", "multi"):
        for tasks in ("1_task", "7_tasks"):
            for dtype in ("fp32", "bf16"):
                assert result["infer_ms"][f"{kind}_{tasks}_{dtype}"] > 0
        assert result["train_step_s"][f"{kind}_fp32"] > 0 and result["train_step_s"][f"{kind}_bf16"] > 0
    assert result["train_step_s"]["single_recipe_24gib"] > 0 and result["recipe_24gib"].startswith("4 x 1, bf16")
    assert result["eval_s_per_image"] > 0 and result["paper_training_hours"]["fp32"] > 0
