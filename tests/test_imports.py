"""The package's import graph, read from the source with ``ast`` (nothing is imported or run): no import cycles among
catlens's modules (function-level imports included) and no private name taken across modules, neither by
``from catlens.x import _name`` nor by ``module._name`` on an imported catlens module. Library code, the analysis
scripts, the figure scripts and the benchmarks are checked; tests may reach into privates."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "catlens"
SCRIPTS = [ROOT / d for d in ("analyses", "figures", "bench", "docs")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, module, names)`` for every import in ``path`` (``names`` empty for ``import x``), relative imports
    resolved against ``name``, the importing module's dotted name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append((node.lineno, base, tuple(a.name for a in node.names)))
    return out


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The longest package module that ``target`` names or lies in."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, f in modules.items():
        for _, base, names in imports_of(f, m):
            for target in [base, *(f"{base}.{n}" for n in names)]:
                t = _owner(target, modules)
                if t and t != m and not m.startswith(t + "."):  # a module's own package is not an edge of interest
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(files: dict[str, Path], modules: dict[str, Path]) -> list[str]:
    """Every private catlens name one module takes from another, as ``file:line: module._name``."""
    found = []
    for m, f in files.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        for line, base, names in imports_of(f, m):
            owner = _owner(base, modules)
            if owner is None or owner == m:
                continue
            found += [f"{f.relative_to(ROOT)}:{line}: {base}.{n}" for n in names if _private(n)]
        aliases = {}  # local name -> catlens module, for `import catlens.x as y` / `from catlens import x`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and _owner(a.name, modules)})
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and aliases[node.value.id] != m):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph(package_modules()))
    assert not found, "import cycles among catlens modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_is_imported_across_modules():
    modules = package_modules()
    files = dict(modules)
    for d in SCRIPTS:
        files.update({str(f.relative_to(ROOT)): f for f in sorted(d.rglob("*.py"))} if d.is_dir() else {})
    found = private_imports(files, modules)
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_the_checks_find_a_planted_cycle_and_a_planted_private_import(tmp_path, monkeypatch):
    """The two checks above fail on wrong code: a planted cycle and planted private uses are reported."""
    pkg = tmp_path / "catlens"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from catlens.b import g\n_x = 1\n")
    (pkg / "b.py").write_text("from catlens import c as cc\n\ndef g():\n    return cc._y\n")
    (pkg / "c.py").write_text("from .a import _x\n_y = 2\n")
    (pkg / "d.py").write_text("import catlens.a\nfrom catlens.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    mods = package_modules()
    assert cycles(import_graph(mods)) == [["catlens.a", "catlens.b", "catlens.c"]]
    assert private_imports(mods, mods) == ["catlens/b.py:4: catlens.c._y", "catlens/c.py:1: catlens.a._x"]


@pytest.mark.parametrize("module", ["catlens.errors", "catlens.runs", "catlens.taxonomy", "catlens.directions",
                                    "catlens.geometry", "catlens.plotting"])
def test_pure_modules_import_no_model_code(module):
    """The math and run-directory modules sit below the model wrapper: they never import it, even lazily."""
    modules = package_modules()
    graph = import_graph(modules)
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert "catlens.model" not in seen, f"{module} reaches catlens.model through {sorted(seen)}"


def test_the_package_runs_no_repository_script():
    """The library never loads a file of the checkout as code (the report once ran figures/*.py by path): what it
    draws comes from catlens.figures, so it works installed anywhere."""
    found = [f"{f.relative_to(ROOT)}" for f in package_modules().values()
             if "spec_from_file_location" in f.read_text() or "run_path(" in f.read_text()]
    assert not found, f"modules that execute files by path: {found}"


def test_every_public_name_is_defined_where_catlens_says():
    """``catlens.<name>`` is imported lazily from the module ``_EXPORTS`` names; each must define it at top level
    (read from the source: no import)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    exports = next(ast.literal_eval(n.value) for n in tree.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_EXPORTS")
    modules = package_modules()
    missing = []
    for name, module in exports.items():
        body = ast.parse(modules[module].read_text()).body
        defined = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        defined |= {a.asname or a.name for n in body if isinstance(n, ast.ImportFrom) for a in n.names}
        if name not in defined:
            missing.append(f"{name} (from {module})")
    assert not missing, f"catlens exports names its modules do not define: {missing}"
    for verb in ("load_model", "load_prompts", "collect", "fit_directions", "separability", "fit_whitener",
                 "orthonormal_basis", "SteeringPolicy", "generate", "judge_records", "rate_table", "train_low_rank",
                 "build_report"):
        assert verb in exports, verb
