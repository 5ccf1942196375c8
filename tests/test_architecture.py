"""The layout rules of docs/architecture.md, checked on the source: imports flow one way, private names stay in
their module, the common options live in one table, and the repository's scripts never edit sys.path."""

import ast
import inspect
import pathlib
import re

import pytest

import fixedpoint
from fixedpoint.options import COMMON_OPTIONS, DEFAULTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fixedpoint"


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module, node):
    """The absolute module named by an ``import``/``from`` node inside ``module``."""
    if node.level == 0:
        return node.module
    package = module.split(".")
    is_package = (PACKAGE / pathlib.Path(*package[1:]) / "__init__.py").exists()
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_imports():
    """{module: set of fixedpoint modules it imports}, counting imports inside functions too."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node)
                for alias in node.names:  # `from . import x` may import the submodule x
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None (the package's __init__ modules re-export and are left out:
    they import their submodules by design)."""
    inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    edges = {m: graph[m] - inits for m in graph if m not in inits}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _package_imports()
    assert "fixedpoint.kernels" in graph["fixedpoint.anderson"]  # the graph sees the imports at all
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]


LAYERS = [  # docs/architecture.md, bottom to top; a module imports only from its own layer and those below
    {"backend", "kernels", "interop", "comm", "checks"},
    {"method", "registry", "options", "result"},
    {"forward", "anderson", "broyden", "linesearch", "iteration", "samples"},
    {"solve", "root"},
]


def test_every_module_has_a_layer():
    """A new module of the package is placed in a layer here and in docs/architecture.md (else it goes unchecked)."""
    placed = {m for layer in LAYERS for m in layer}
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top <= placed, sorted(top - placed)
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert all(f"`{m}.py`" in text for m in placed), sorted(m for m in placed if f"`{m}.py`" not in text)


def test_layers_import_downwards_only():
    graph = _package_imports()
    layer_of = {f"fixedpoint.{m}": i for i, layer in enumerate(LAYERS) for m in layer}
    for m, i in layer_of.items():
        above = {d for d in graph[m] if layer_of.get(d, len(LAYERS)) > i}  # torch/, problems, __main__: above all
        assert not above, (m, above)
    methods = {"fixedpoint.forward", "fixedpoint.anderson", "fixedpoint.broyden", "fixedpoint.linesearch"}
    loop = {"fixedpoint.iteration", "fixedpoint.samples"}
    for m in methods:
        assert not graph[m] & loop, m
    for m in loop:
        assert not graph[m] & methods, m
    for m in graph:
        if not m.startswith("fixedpoint.torch"):
            assert not {d for d in graph[m] if d.startswith("fixedpoint.torch")}, m


def test_private_names_are_used_only_in_their_module():
    """No ``from .x import _name`` and no ``module._name`` across the package's own modules."""
    found = []
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = set()  # names bound to the package's modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fixedpoint")):
                found += [f"{path.name}: {a.name}" for a in node.names if re.match(r"_[^_]", a.name)]
                target = _resolve(_module_name(path), node)
                own |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                own |= {a.asname or a.name for a in node.names if a.name in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and re.match(r"_[^_]", node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in own):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert found == []


def test_no_script_of_the_repository_edits_sys_path():
    edits = []
    for folder in ("fixedpoint", "demos", "benchmarks", "tooling", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            edits += [f"{path.relative_to(ROOT)}: {m.group(0)}"
                      for m in re.finditer(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=", text)]
    assert edits == []


def test_solve_takes_its_defaults_from_the_options_table():
    params = inspect.signature(fixedpoint.solve).parameters
    assert [p for p in params if p in COMMON_OPTIONS] == list(COMMON_OPTIONS)
    for name, option in COMMON_OPTIONS.items():
        assert params[name].default is option.default is DEFAULTS[name]
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_every_common_option_is_documented_in_solve():
    doc = fixedpoint.solve.__doc__
    for name in COMMON_OPTIONS:
        assert re.search(rf"^    {name} : ", doc, re.M), name


def test_the_option_reference_is_written_from_the_tables():
    from tooling import doc_options

    text = doc_options.render()
    assert doc_options.PAGE.read_text(encoding="utf-8") == text, "run python -m tooling.doc_options"
    for name, option in COMMON_OPTIONS.items():
        assert f"| `{name}` |" in text and option.doc.split(";")[0] in text


def test_the_deq_layer_and_its_functional_form_share_one_table_of_defaults():
    pytest.importorskip("torch")
    from fixedpoint.torch import DEQ, deq_fixed_point
    from fixedpoint.torch.config import LAYER_DEFAULTS, LayerOptions

    layer = inspect.signature(DEQ.__init__).parameters
    functional = inspect.signature(deq_fixed_point).parameters
    for name, default in LAYER_DEFAULTS.items():
        assert layer[name].default is default and functional[name].default is default, name
    assert LAYER_DEFAULTS["max_iter"] == DEFAULTS["max_iter"]
    # the overloads' keyword arguments are the functional form's, by name
    assert set(LayerOptions.__annotations__) == set(functional) - {"f", "x", "z0", "jacobian_probes"}
