"""The package's layout holds (docs/architecture.md): floors, no import circle, imports at the top of files,
light modules stay light, no module over 600 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stablemtl"
# each module's floor; a module imports only modules of its floor or below (docs/architecture.md)
FLOORS = {
    0: ("stablemtl", "stablemtl.options", "stablemtl.guard", "stablemtl.presets", "stablemtl.paths",
        "stablemtl.devices", "stablemtl.progress"),
    1: ("stablemtl.metrics", "stablemtl.tasks", "stablemtl.benchmarks"),
    2: ("stablemtl.data",),  # and every stablemtl.data.* module
    3: ("stablemtl.model",),  # and every stablemtl.model.* module
    4: ("stablemtl.results", "stablemtl.train_config", "stablemtl.train", "stablemtl.evaluate", "stablemtl.predict"),
    5: ("stablemtl.stages", "stablemtl.schema", "stablemtl.comparisons", "stablemtl.report", "stablemtl.reproduction",
        "stablemtl.figures", "stablemtl.views", "stablemtl.browse"),
    6: ("stablemtl.run", "stablemtl.kernel", "stablemtl.rehearse", "stablemtl.rehearse_report", "stablemtl.watch", "stablemtl.cli"),
}
HEAVY = ("torch", "diffusers", "transformers", "accelerate")  # what a light module never imports at its top
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = _modules()


def floor(module: str) -> int:
    for level, names in FLOORS.items():
        if module in names or any(module.startswith(n + ".") for n in names if n in ("stablemtl.data",
                                                                                        "stablemtl.model")):
            return level
    raise AssertionError(f"{module} has no floor: add it to FLOORS here and to docs/architecture.md")


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported name, at the top of the file) for every import statement of ``module``; package modules
    are resolved (``from stablemtl import train`` -> ``stablemtl.train``)."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{module}: relative import of {node.module}"
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            # ``from package import submodule`` imports the submodule (the package's __init__ is docs only)
            names = submodules + ([node.module] if len(submodules) < len(node.names) else [])
        else:
            continue
        out += [(name, id(node) in top) for name in names]
    return out


def package_imports(module: str) -> list[tuple[str, bool]]:
    return [(name, at_top) for name, at_top in imports(module) if name in MODULES and name != module]


def heavy(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing ``module`` imports torch (or diffusers, transformers, accelerate)."""
    if any(name.split(".")[0] in HEAVY for name, at_top in imports(module) if at_top):
        return True
    return any(heavy(name, seen | {module}) for name, at_top in package_imports(module)
               if at_top and name not in seen)


def test_every_import_stays_on_its_floor_or_goes_down():
    up = [f"{m} (floor {floor(m)}) imports {name} (floor {floor(name)})" for m in MODULES
          for name, _ in package_imports(m) if floor(name) > floor(m)]
    assert up == []


def test_no_import_circle():
    graph = {m: {name for name, _ in package_imports(m)} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_package_imports_sit_at_the_top_except_a_light_module_importing_a_heavy_one():
    """The one kind of import inside a function: a module that stays light (no torch on import: the CLI's
    parser, the schema, the result tables) importing a module that imports torch, where it is used."""
    hidden = [f"{m} imports {name} inside a function" for m in MODULES for name, at_top in package_imports(m)
              if not at_top and (heavy(m) or not heavy(name))]
    assert hidden == []


def test_the_light_modules_import_no_torch():
    light = ["stablemtl.cli", "stablemtl.schema", "stablemtl.report", "stablemtl.results", "stablemtl.benchmarks",
             "stablemtl.paths", "stablemtl.presets", "stablemtl.metrics", "stablemtl.progress"]
    assert [m for m in light if heavy(m)] == []
    probe = ("import sys\n" + "".join(f"import {m}\n" for m in light)
             + f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_600_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES


def test_every_notebook_checks_its_inputs_through_the_stage_graph():
    """The graph is written once (``stages.GRAPH``): a notebook that reads other stages checks them with
    ``stages.check_inputs`` of its own stage, and names no stage it reads itself."""
    import nbformat

    from stablemtl.stages import GRAPH

    for key, stage in GRAPH.items():
        nb = nbformat.read(str(PACKAGE.parent / "notebooks" / f"{stage.name}.ipynb"), as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "stages.require(" not in code and "paths." not in code, stage.name
        if stage.reads:
            assert f'stages.check_inputs(study, "{key}"' in code, stage.name
        # its parameters, checked as `stablemtl run` checks them, before anything uses them
        cells = [c.source for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in nb.cells[[c.cell_type for c in nb.cells].index("code")].metadata.get("tags", [])
        assert cells[1].index("schema.check_notebook_parameters(globals())") < cells[1].index("stages.context("), \
            stage.name
