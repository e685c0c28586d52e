"""Import cost of the package and its light modules, in fresh interpreters.

Prints one JSON object: seconds (median of ``--repeat`` runs) for a bare
interpreter, ``import stablemtl``, ``stablemtl.metrics``,
``stablemtl.data.formats`` and ``stablemtl.tasks`` (which loads torch), each
also as a ratio to the bare interpreter, plus the heavy modules each import
pulled in. Target: ``import stablemtl`` under 2 s.

    .venv/bin/python benchmarks/bench_import.py [--repeat 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "cv2", "matplotlib", "pandas", "OpenEXR", "h5py")
STATEMENTS = {
    "bare": "pass",
    "stablemtl": "import stablemtl",
    "stablemtl.metrics": "import stablemtl.metrics",
    "stablemtl.data.formats": "import stablemtl.data.formats",
    "stablemtl.tasks": "import stablemtl.tasks",
}


def measure(statement: str, repeat: int) -> tuple[float, list[str]]:
    probe = f"{statement}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    times, loaded = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                text=True).stdout.strip()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [m for m in loaded.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {name: measure(stmt, args.repeat) for name, stmt in STATEMENTS.items()}
    bare = results["bare"][0]
    out = {
        "import_s": {name: round(t, 4) for name, (t, _) in results.items()},
        "ratio_to_bare": {name: round(t / bare, 2) for name, (t, _) in results.items()},
        "heavy_modules_loaded": {name: mods for name, (_, mods) in results.items()},
        "stablemtl_import_under_2s": results["stablemtl"][0] < 2.0,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
