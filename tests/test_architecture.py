"""The layout rules of ddpm/ and jobs/, read from the source with ``ast``: one-way layers, no import cycle
(imports inside functions count), no other module's ``_private`` names, small modules and thin jobs.

An edge is what an import statement names: ``from ddpm.nets.registry import build_net`` is an edge to
``ddpm.nets.registry`` (not to the package ``ddpm.nets`` that Python runs first).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, python_env

# What each part may import (besides itself). The config validates against the data-set table, the
# net registry and the objectives (which samplers and nets fit each), so it sits above ``data``, ``nets``
# and ``diffusion``; ``diffusion`` reads a config only through its attributes. Training and evaluation are
# siblings that never import each other.
BELOW = {
    "errors": set(),
    "data": {"errors"},
    "nets": {"errors"},
    "diffusion": {"errors", "data"},
    "config": {"errors", "data", "nets", "diffusion"},
    "run": {"errors", "config", "data", "nets"},
    "train": {"errors", "config", "data", "nets", "diffusion", "run"},
    "evaluate": {"errors", "config", "data", "nets", "diffusion", "run"},
    "cluster": {"errors", "config", "run"},
    "version": set(),
}
JOB_LINES, MODULE_LINES = 150, 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for folder in ("ddpm", "jobs") for p in sorted((ROOT / folder).rglob("*.py"))}


def part(module: str) -> str:
    """The layer a module belongs to: ddpm.train.loop → train, ddpm.config → config, jobs.x → jobs."""
    pieces = module.split(".")
    if pieces[0] == "jobs":
        return "jobs"
    return pieces[1] if len(pieces) > 1 else "version"


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported ddpm/jobs module, names taken from it, line) for every import in ``module``, nested ones too."""
    tree = ast.parse(SOURCES[module].read_text())
    package = module if SOURCES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in ("ddpm", "jobs")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in ("ddpm", "jobs"):
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{base}.{n}" in SOURCES]
            found += [(f"{base}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((base, rest, node.lineno))
    return found


GRAPH = {m: sorted({target for target, _, _ in imports(m) if target in SOURCES and target != m}) for m in SOURCES}


def test_the_sources_were_found():
    assert {"ddpm.config", "ddpm.train.loop", "ddpm.evaluate.plan", "jobs.train"} <= SOURCES.keys()


def test_no_import_cycle():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in GRAPH[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in GRAPH:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_are_one_way():
    wrong = []
    for m in SOURCES:
        here = part(m)
        if here == "jobs":
            continue
        for target, _, line in imports(m):
            there = part(target)
            if there == "jobs" or (there not in (here, "version") and there not in BELOW[here]):
                wrong.append(f"{SOURCES[m].relative_to(ROOT)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layers:\n  " + "\n  ".join(wrong)


def test_no_private_names_of_other_modules():
    wrong = []
    for m in SOURCES:
        tree = ast.parse(SOURCES[m].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name.startswith("ddpm")})
        for target, names, line in imports(m):
            wrong += [f"{m}:{line} imports {target}.{n}" for n in names if n.startswith("_") and target != m]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private names used across modules:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_size(module):
    lines = len(SOURCES[module].read_text().splitlines())
    limit = JOB_LINES if module.startswith("jobs") else MODULE_LINES
    assert lines < limit, f"{SOURCES[module].relative_to(ROOT)} has {lines} lines (limit {limit}): split it"


def test_no_grab_bag_modules_and_every_package_says_what_it_holds():
    assert not [p for p in SOURCES.values() if p.stem in ("utils", "util", "helpers", "misc", "common")]
    for m, p in SOURCES.items():
        if p.name == "__init__.py" and m.count(".") == 1:
            doc = ast.get_docstring(ast.parse(p.read_text()))
            assert doc and "Public surface" in doc, f"{p.relative_to(ROOT)} must name its public surface"


def test_cluster_and_config_import_without_torch():
    """A login node's jobs.submit / jobs.tensorboard (and --help of every job) must not pay for torch."""
    pytest.importorskip("submitit", reason="submitit is not installed")  # ddpm.cluster.launch needs it
    code = ("import sys\n"
            "import ddpm.cluster.launch, ddpm.cluster.slurm, ddpm.cluster.sweep, ddpm.cluster.tensorboard\n"
            "import ddpm.config, ddpm.run.metrics_log, ddpm.data.datasets\n"
            "import jobs.train, jobs.submit, jobs.tensorboard, jobs.prepare_data, jobs.train_classifier\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing these modules imported torch"
