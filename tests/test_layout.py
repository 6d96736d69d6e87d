"""The package's layout: the library never imports the application (`keras_wt.app`) nor, outside
its backend module, TensorFlow; no module imports itself back through others, and no Python
module sits beside `setup.py`."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_wt")
APP = "keras_wt.app"


def _modules():
    """`{module name: path}` of every module of the package."""
    found = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


MODULES = _modules()
LIBRARY = sorted(m for m in MODULES if m != APP and not m.startswith(APP + "."))


def _imports(path, top_level_only):
    """The `keras_wt` modules that the file at `path` imports (at module level only, or
    anywhere, functions included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m in MODULES}


def test_the_library_never_imports_the_application():
    offenders = {m: sorted(i for i in _imports(MODULES[m], top_level_only=False)
                           if i == APP or i.startswith(APP + "."))
                 for m in LIBRARY}
    assert {m: i for m, i in offenders.items() if i} == {}


BACKEND = "keras_wt.backend"


def _imports_tensorflow(path, framework="tensorflow"):
    """Whether the file at `path` imports `framework` (or a module of it), anywhere in it."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == framework or name.startswith(framework + ".") for name in names):
            return True
    return False


def test_only_the_backend_module_imports_tensorflow():
    """The library reaches TensorFlow only through `keras_wt.backend` (the application,
    `keras_wt.app`, may use `tf.data` and `tf.distribute` freely)."""
    importing = sorted(
        m for m in LIBRARY
        if m != BACKEND and not m.startswith(BACKEND + ".") and _imports_tensorflow(MODULES[m])
    )
    assert importing == []
    assert _imports_tensorflow(MODULES[BACKEND + ".tensorflow"])


def test_only_the_jax_backend_module_imports_jax():
    """JAX likewise: only `keras_wt.backend.jax` and its Philox generator import it, and the
    JAX implementation does not import TensorFlow."""
    importing = sorted(m for m in LIBRARY if _imports_tensorflow(MODULES[m], "jax"))
    assert importing == [BACKEND + ".jax", BACKEND + ".philox"]
    assert not _imports_tensorflow(MODULES[BACKEND + ".jax"])
    assert not _imports_tensorflow(MODULES[BACKEND + ".philox"])


def test_importing_the_library_leaves_the_application_unimported():
    """In a fresh interpreter, with every library module imported, no `keras_wt.app` module is
    loaded (and every one of them imports)."""
    code = ("import importlib, sys\n"
            f"for name in {LIBRARY!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m == {APP!r} or m.startswith({APP + '.'!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_import_cycle():
    """The module-level imports between the package's modules form no cycle (the root package,
    whose names load lazily, aside)."""
    graph = {m: _imports(p, top_level_only=True) - {"keras_wt", m} for m, p in MODULES.items()}
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for other in sorted(graph.get(module, ())):
            cycle = visit(other)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        assert visit(module) is None


def test_no_top_level_module_besides_setup_py():
    assert sorted(n for n in os.listdir(ROOT) if n.endswith(".py")) == ["setup.py"]
