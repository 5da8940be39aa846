"""The import rules of the layout (README "Layout"), the run-time ones checked in a fresh interpreter (sys.modules of
this process is polluted):

- the layering of symi_sim (see symi_sim/__init__.py): each layer imports only the layers below it; the shared core
  imports nothing else of the project; symi_exec imports only the core (and the trace format, to write the trace it
  records). Checked on the source: every import statement, also those inside functions.
- `import cli; import symi_sim` and every symi_sim submodule: torch never loaded, never even looked up.
- `import symi_sim.policies` (and every policy module): nothing outside the standard library but numpy.
- symi_exec never imports simpy, neither at run time nor anywhere in its source.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter. argv: modules to import, packages to import with all their submodules,
# top-level names whose import attempts to record. Prints what got imported and what the imports added.
_PROBE = r"""
import importlib, json, pkgutil, sys

modules, packages, watched = (json.loads(arg) for arg in sys.argv[1:4])
baseline = {name.partition(".")[0] for name in sys.modules}
attempted = set()


class _Recorder:
    # First on sys.meta_path: sees every import that is not already cached, including guarded
    # `try: import torch` and importlib.util.find_spec probes, then lets the real finders answer.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in watched:
            attempted.add(name)
        return None


sys.meta_path.insert(0, _Recorder())
imported = []
for name in modules:
    importlib.import_module(name)
    imported.append(name)
for package in packages:
    root = importlib.import_module(package)
    imported.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
added = sorted({name.partition(".")[0] for name in sys.modules} - baseline)
print(json.dumps({"imported": imported, "added": added, "attempted": sorted(attempted)}))
"""


def _probe(modules=(), packages=(), watched=()) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(modules)), json.dumps(list(packages)),
         json.dumps(list(watched))],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"import failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_probe_detects_a_violation():
    # The harness itself must be able to fail: json's encoder is imported by the probe before the baseline,
    # so use a module nothing else loads.
    report = _probe(modules=["pandas"], watched=["pandas", "numpy"])
    assert "pandas" in report["added"] and "numpy" in report["added"]
    assert "pandas" in report["attempted"] and "numpy" in report["attempted"]
    assert _probe(modules=["colorsys"], watched=["pandas"]) == {
        "imported": ["colorsys"], "added": ["colorsys"], "attempted": []}


def test_cli_and_symi_sim_never_touch_torch():
    report = _probe(modules=["cli"], packages=["symi_sim"], watched=["torch", "symi_exec"])
    assert "symi_sim.policies" in report["imported"]  # the walk really covered the package
    assert "symi_sim.simulator.convergence" in report["imported"] and "symi_sim.figures.registry" in report["imported"]
    assert report["attempted"] == [], f"torch / symi_exec looked up while importing: {report['attempted']}"
    assert "torch" not in report["added"] and "symi_exec" not in report["added"]


HEAVY = ("pandas", "simpy", "torch", "matplotlib", "pyarrow", "scipy", "click", "tqdm")


def test_policies_import_nothing_heavier_than_numpy():
    report = _probe(packages=["symi_sim.policies"], watched=HEAVY)
    assert "symi_sim.policies.static" in report["imported"]
    assert report["attempted"] == [], f"symi_sim.policies looked up {report['attempted']}"
    third_party = [name for name in report["added"]
                   if name not in sys.stdlib_module_names and name not in ("numpy", "symi_sim")]
    assert third_party == [], f"symi_sim.policies loaded {third_party}"


def _imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`: import statements anywhere (also inside functions) and
    importlib.import_module / __import__ calls with a literal name; `from X import a, b` gives X.a and X.b."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            found.append((node.lineno, node.args[0].value))
    return found


def _simpy_imports(source: str) -> list[int]:
    """Line numbers of imports of simpy in `source`: import statements anywhere (also inside functions)
    and importlib.import_module / __import__ calls with a literal name."""
    return sorted({line for line, name in _imports(source) if name.partition(".")[0] == "simpy"})


def test_simpy_import_finder():
    source = (
        '"""Never imports simpy: import simpy is forbidden here."""\n'  # a docstring is not an import
        "import numpy as np\n"
        "import simpy\n"
        "from simpy.resources import Resource\n"
        "def f():\n"
        "    import os, simpy.core as core\n"
        "    importlib.import_module('simpy.events')\n"
        "    return __import__('simpy')\n"
        "from . import simpy_free\n"
        "import simpyish\n"
    )
    assert _simpy_imports(source) == [3, 4, 6, 7, 8]


SYMI_EXEC = REPO_ROOT / "symi_exec"


def test_symi_exec_source_never_imports_simpy():
    offenders = {}
    for path in sorted(SYMI_EXEC.rglob("*.py")):
        lines = _simpy_imports(path.read_text())
        if lines:
            offenders[str(path.relative_to(REPO_ROOT))] = lines
    assert offenders == {}, f"symi_exec imports simpy at {offenders}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_symi_exec_never_loads_simpy():
    report = _probe(packages=["symi_exec"], watched=["simpy"])
    expected = {
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in SYMI_EXEC.rglob("*.py")
        if all((parent / "__init__.py").is_file() for parent in path.parents if SYMI_EXEC in (parent, *parent.parents))
    }
    assert expected <= set(report["imported"]), f"not imported: {sorted(expected - set(report['imported']))}"
    assert report["attempted"] == [], f"importing symi_exec looked up {report['attempted']}"
    assert "simpy" not in report["added"]


# symi_sim's layers (symi_sim/__init__.py) and symi_exec: what each may import of the project, itself included.
CORE = ("symi_sim.checks", "symi_sim.outputs", "symi_sim.config_files", "symi_sim.cluster", "symi_sim.models",
        "symi_sim.placement", "symi_sim.placement_formats", "symi_sim.routing", "symi_sim.live_shares",
        "symi_sim.live_bounds", "symi_sim.live_reference", "symi_sim.policies")
LAYERS = {
    "core": CORE,
    "traces": ("symi_sim.traces",),
    "failures": ("symi_sim.failures",),
    "figures": ("symi_sim.figures",),
    "simulator": ("symi_sim.simulator",),
    "symi_exec": ("symi_exec",),
}
ALLOWED = {
    "core": {"core"},
    "traces": {"core", "traces"},
    "failures": {"core", "failures"},
    "figures": {"core", "traces", "figures"},
    "simulator": {"core", "traces", "failures", "figures", "simulator"},
    "symi_exec": {"core", "symi_exec"},
}
# Documented exceptions: the executor writes the trace it records (--record-trace) in the one trace format.
EXCEPTIONS = {"symi_exec": ("symi_sim.traces.format",)}


def _layer(module: str) -> str | None:
    """The layer of a dotted module name (or of a name imported from it), None outside symi_sim / symi_exec."""
    for layer, prefixes in LAYERS.items():
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return layer
    if module.partition(".")[0] in ("symi_sim", "symi_exec"):
        return "unassigned"
    return None


def _layering_violations(root: Path) -> dict[str, list[str]]:
    violations: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts).removesuffix(".__init__")
        layer = _layer(module)
        if module == "symi_sim":
            continue  # the package docstring and version only
        for line, name in _imports(path.read_text()):
            target = _layer(name)
            if target is None or target in ALLOWED.get(layer, ()):
                continue
            if any(name == ok or name.startswith(ok + ".") for ok in EXCEPTIONS.get(layer, ())):
                continue
            violations.setdefault(module, []).append(f"line {line}: {name} ({layer} -> {target})")
    return violations


def test_every_module_has_a_layer():
    for root in (REPO_ROOT / "symi_sim", SYMI_EXEC):
        for path in root.rglob("*.py"):
            module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            assert module == "symi_sim" or _layer(module) not in (None, "unassigned"), f"{module} has no layer"


def test_layers_import_only_the_layers_below():
    offenders = {**_layering_violations(REPO_ROOT / "symi_sim"), **_layering_violations(SYMI_EXEC)}
    assert offenders == {}, f"imports across the layering: {offenders}"


def test_layering_check_can_fail(tmp_path):
    # the checker itself must catch a core module importing the simulator, even inside a function
    core = tmp_path / "symi_sim" / "policies"
    core.mkdir(parents=True)
    (core / "bad.py").write_text("import numpy\n\ndef f():\n    from symi_sim.simulator.driver import simulate\n")
    assert _layering_violations(tmp_path / "symi_sim") == {
        "symi_sim.policies.bad": ["line 4: symi_sim.simulator.driver.simulate (core -> simulator)"]}
