"""The CLI layer (pipeline/cli/) and the package's import structure.

* every command group is imported by name: a module that cannot be imported fails the CLI loudly
  (it used to be skipped, silently removing its commands);
* ``--help`` imports neither torch nor Ray;
* argparse and print live only in the CLI (and in the ``python -m pipeline.demo`` script);
* the wings import in layers, and no module imports another in a loop.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli_env

PACKAGE = ROOT / "pipeline"
COMMANDS = ("extract", "verify", "index", "search", "submit", "status", "logs")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_help_lists_every_command_without_importing_torch_or_ray():
    run = python("import sys\n"
                 "from pipeline.cli import main\n"
                 "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    code = exc.code\n"
                 "heavy = [m for m in ('torch', 'torchvision', 'ray') if m in sys.modules]\n"
                 "print('EXIT', code, 'HEAVY', heavy)\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "EXIT 0 HEAVY []"
    listed = re.findall(r"^    (\w+) ", run.stdout, re.M)  # a command's first help line
    assert tuple(listed) == COMMANDS, run.stdout


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], env=cli_env(),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert (run.returncode, run.stdout.strip()) == (0, "vgg-pipeline 0.1.0"), run.stderr


@pytest.mark.parametrize("broken", ["pipeline.retrieval.search", "pipeline.submit"])
def test_a_command_module_that_cannot_be_imported_fails_loudly(broken):
    """``sys.modules[name] = None`` makes ``import name`` raise ImportError, as a syntax error or a
    missing dependency in that module would: the CLI must not start without its commands."""
    run = python(f"import sys\nsys.modules[{broken!r}] = None\n"
                 "from pipeline.cli import main\nsys.exit(main(['--help']))\n")
    assert run.returncode == 1, run.stdout
    assert "Traceback" in run.stderr and f"import of {broken} halted" in run.stderr, run.stderr
    assert "usage:" not in run.stdout


# ----------------------------------------------------------------------------- import structure

def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``name`` imports, at module level or inside functions (lazy imports count:
    they load the module all the same).  ``from pipeline import __version__`` is not counted: the
    root package only re-exports the API."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(c for c in [target, *(f"{target}.{a.name}" for a in node.names)] if c in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found - {name, "pipeline"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_loops(graph):
    loops = []
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                loops.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert loops == []


# What each wing must never import: the layers are decode < input < model < output < run, retrieval
# < the CLI and the API (the model reads weights from any fsspec path through input.storage).
FORBIDDEN = {
    "decode": {"model", "input", "output", "run", "retrieval"},
    "input": {"model", "output", "run", "retrieval"},
    "model": {"output", "run", "retrieval"},
    "output": {"run", "retrieval"},
    "run": {"retrieval"},
    "retrieval": {"run"},
}


def test_wings_import_in_layers(graph):
    def wing(module: str) -> str:
        return module.split(".")[1] if module.count(".") else ""

    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                   if wing(d) in FORBIDDEN.get(wing(m), set()))
    assert wrong == []
    # Only the CLI imports the CLI; the cluster library (submit) is the CLI's alone too.
    users = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                   if (d.startswith("pipeline.cli") or d == "pipeline.submit") and not m.startswith("pipeline.cli"))
    assert users == []


# The demo script (``python -m pipeline.demo``) is a command line of its own.
MAY_PRINT = ("pipeline/cli/", "pipeline/demo.py")


def test_only_the_cli_parses_arguments_and_prints():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(MAY_PRINT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno} print")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    offenders.append(f"{rel}:{node.lineno} argparse")
    assert offenders == []
