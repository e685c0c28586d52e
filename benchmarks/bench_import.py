"""Import cost of the package and its light modules, and the start time of the command line, in fresh
interpreters.

Prints one JSON object: seconds (median of ``--repeat`` runs) for a bare interpreter,
``import stablemtl``, ``stablemtl.metrics``, ``stablemtl.data.formats`` and ``stablemtl.tasks``
(which loads torch), each also as a ratio to the bare interpreter, plus the heavy modules each import
pulled in; then the wall time of ``stablemtl --help``, ``stablemtl --version`` and every subcommand's
``--help`` through the installed console script (``cli_s``). Targets: ``import stablemtl`` under 2 s,
every help under 0.5 s (``cli_help_under_0.5s``).

    .venv/bin/python benchmarks/bench_import.py [--repeat 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "cv2", "matplotlib", "pandas", "OpenEXR", "h5py")
STATEMENTS = {
    "bare": "pass",
    "stablemtl": "import stablemtl",
    "stablemtl.metrics": "import stablemtl.metrics",
    "stablemtl.data.formats": "import stablemtl.data.formats",
    "stablemtl.tasks": "import stablemtl.tasks",
}
HELP_TARGET_S = 0.5


def measure(statement: str, repeat: int) -> tuple[float, list[str]]:
    probe = f"{statement}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    times, loaded = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                text=True).stdout.strip()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [m for m in loaded.split(",") if m]


def subcommands() -> list[str]:
    """The subcommands as ``stablemtl --help`` lists them (its ``{run,data,...}`` line)."""
    out = subprocess.run([str(script()), "--help"], check=True, capture_output=True, text=True).stdout
    choices = next(line for line in out.splitlines() if line.strip().startswith("{"))
    return choices.strip().strip("{}").split(",")


def script() -> Path:
    return Path(sys.executable).with_name("stablemtl")


def measure_command(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([str(script()), *argv], capture_output=True)  # --version: any status
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {name: measure(stmt, args.repeat) for name, stmt in STATEMENTS.items()}
    bare = results["bare"][0]
    commands = {"--help": ["--help"], "--version": ["--version"]}
    commands.update({f"{name} --help": [name, "--help"] for name in subcommands()})
    cli = {name: round(measure_command(argv, args.repeat), 4) for name, argv in commands.items()}
    helps = [t for name, t in cli.items() if name.endswith("--help")]
    out = {
        "import_s": {name: round(t, 4) for name, (t, _) in results.items()},
        "ratio_to_bare": {name: round(t / bare, 2) for name, (t, _) in results.items()},
        "heavy_modules_loaded": {name: mods for name, (_, mods) in results.items()},
        "stablemtl_import_under_2s": results["stablemtl"][0] < 2.0,
        "cli_s": cli,
        "cli_help_max_s": max(helps),
        f"cli_help_under_{HELP_TARGET_S}s": max(helps) < HELP_TARGET_S,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
