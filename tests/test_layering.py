"""Data flows one way: the core (everything under ``dithooks/``) never imports ``dithooks.probes``
(``probes/``) or ``dithooks.cli`` (``cli/``), which sit on top of it and exist only once installed.

Three checks:
- statically, no ``import`` statement under ``dithooks/`` (at any depth, relative or absolute, at
  module level or inside a function) names ``dithooks.probes`` or ``dithooks.cli``;
- every core module imports in a fresh interpreter where importing either raises;
- ``import dithooks`` and every core module work from a plain copy of the source tree
  (``git archive HEAD dithooks``) put on ``PYTHONPATH``, with the editable install's finder removed.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dithooks"
FORBIDDEN = ("dithooks.probes", "dithooks.cli")


def core_modules(base: Path = CORE) -> list[str]:
    """Dotted names of every module and package under ``base`` (= the ``dithooks`` folder)."""
    out = []
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if "__pycache__" in parts:
            continue
        out.append(".".join(parts))
    return out


def forbidden_imports(source: str, where: str, module: str, is_package: bool) -> list[str]:
    """``where:line imported-name`` for every import of a forbidden package in ``source``, the
    text of module ``module`` (a package's ``__init__`` when ``is_package``)."""
    tree = ast.parse(source, where)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # relative imports resolve against the package: a package's __init__ is its own package
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for n in names:
            if any(n == f or n.startswith(f + ".") for f in FORBIDDEN):
                found.append(f"{where}:{node.lineno} {n}")
                break
    return found


def test_relative_import_resolution_is_right():
    """The checker itself: ``from ..probes.x import y`` in dithooks/a/b.py is dithooks.probes.x."""
    src = "import os\nfrom ..probes.modes import band\nfrom .. import cli\nfrom .probes import z\n" \
          "def f():\n    import dithooks.cli.main\n"
    got = forbidden_imports(src, "f", "dithooks.a.b", is_package=False)
    assert got == ["f:2 dithooks.probes.modes", "f:3 dithooks.cli", "f:6 dithooks.cli.main"]
    # in a package's __init__ one dot is the package itself: in dithooks/a/__init__.py ".probes"
    # is dithooks.a.probes (allowed) and ".." is dithooks; in dithooks/__init__.py ".probes" is ours
    got = forbidden_imports(src, "f", "dithooks.a", is_package=True)
    assert got == ["f:2 dithooks.probes.modes", "f:3 dithooks.cli", "f:6 dithooks.cli.main"]
    got = forbidden_imports(src, "f", "dithooks", is_package=True)
    assert got == ["f:4 dithooks.probes", "f:6 dithooks.cli.main"]


def test_no_core_module_imports_probes_or_cli():
    bad = []
    for f in sorted(CORE.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        rel = f.relative_to(ROOT).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        bad += forbidden_imports(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)), module, is_package)
    assert not bad, "the core imports probes/ or cli/ (data must flow one way):\n" + "\n".join(bad)


# Run in a fresh interpreter: import every named module, report what happened as JSON.
_IMPORT_ALL = textwrap.dedent("""
    import importlib, json, sys
    from importlib.abc import MetaPathFinder

    modules, block, drop_editable = json.loads(sys.argv[1])

    class Blocked(ImportError):
        pass

    class Refuse(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in block):
                raise Blocked("LAYERING: " + name)
            return None

    if drop_editable:  # the editable install maps dithooks.* onto the checkout: not a plain tree
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(type(f), "__module__", "").startswith("__editable__")
                            and not getattr(f, "__module__", "").startswith("__editable__")]
    sys.meta_path.insert(0, Refuse())
    out = {"errors": {}, "missing_dependency": {}}
    import dithooks
    out["dithooks_file"] = dithooks.__file__
    for m in modules:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("dithooks") and not str(e).startswith("LAYERING"):
                out["missing_dependency"][m] = e.name  # an optional third-party package
            else:
                out["errors"][m] = f"{type(e).__name__}: {e}"
        except Exception as e:
            out["errors"][m] = f"{type(e).__name__}: {e}"
    out["loaded_forbidden"] = sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in block))
    print(json.dumps(out))
""")


def _import_all(modules: list[str], *, pythonpath: str | None, drop_editable: bool, cwd: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps([modules, list(FORBIDDEN), drop_editable])],
                       capture_output=True, text=True, env=env, cwd=str(cwd), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_core_module_imports_without_probes_and_cli(tmp_path):
    modules = core_modules()
    assert "dithooks.capture" in modules and "dithooks.analysis.modes" in modules
    out = _import_all(modules, pythonpath=None, drop_editable=False, cwd=tmp_path)
    assert not out["errors"], "core modules that need probes/ or cli/ (or fail) at import:\n" + \
        "\n".join(f"{m}: {e}" for m, e in out["errors"].items())
    assert out["loaded_forbidden"] == []


def test_core_imports_from_a_plain_source_tree(tmp_path):
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (git archive HEAD dithooks)")
    tree = tmp_path / "src"
    tree.mkdir()
    archive = subprocess.run([git, "-C", str(ROOT), "archive", "HEAD", "dithooks"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    assert not (tree / "dithooks" / "probes").exists()  # probes/ and cli/ are not in the plain tree
    modules = core_modules(tree / "dithooks")
    out = _import_all(modules, pythonpath=str(tree), drop_editable=True, cwd=tmp_path)
    assert Path(out["dithooks_file"]).resolve().is_relative_to(tree.resolve()), out["dithooks_file"]
    assert not out["errors"], "core modules that fail to import from a plain source tree:\n" + \
        "\n".join(f"{m}: {e}" for m, e in out["errors"].items())
    assert out["loaded_forbidden"] == []


def test_probes_reexport_the_core_implementations():
    """probes/ keeps its public names, now thin re-exports of the core (one implementation each)."""
    from dithooks.analysis import difference_modes as core_dm
    from dithooks.analysis import modes as core_modes
    from dithooks.analysis import routing_summary as core_rs
    from dithooks.probe_api import probe_class
    from dithooks.probes import modes, routing_summary
    from dithooks.probes.builtin import DifferenceModes
    from dithooks.protocols.protocol2 import Protocol2Modes

    for name in modes.__all__:
        assert getattr(modes, name) is getattr(core_modes, name)
    for name in routing_summary.__all__:
        assert getattr(routing_summary, name) is getattr(core_rs, name)
    assert probe_class("difference_modes") is DifferenceModes
    assert issubclass(DifferenceModes, core_dm.DifferenceModes) and issubclass(Protocol2Modes, core_dm.DifferenceModes)
    assert not issubclass(Protocol2Modes, DifferenceModes)  # protocol2 extends the core class, not probes/
    assert DifferenceModes.label() == Protocol2Modes.label() == "difference_modes"
    assert core_rs.PREFIX == "probe.routing."
