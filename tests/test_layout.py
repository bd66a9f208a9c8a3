"""The layout's import rules (docs/DESIGN.md, "Import rules"), read from the source with ast: lazy imports inside
functions count too, so a rule cannot be dodged by moving an import into a function.

- refimpl's math modules import only numpy and the standard library;
- refimpl never imports onnx, onnxruntime, refformer.export or refformer.runtime; torch and transformers only
  lazily (inside a function), and only from refimpl/convert/ and refimpl/training/;
- export never imports runtime;
- no module imports another in a cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"refformer": "package", "refformer.refimpl": "refimpl", "refformer.export": "export",
            "refformer.runtime": "runtime"}
MATH = ["ops", "attention", "layers", "model", "loss", "optim", "generate", "config", "errors", "gradcheck", "tree"]
FORWARD_TWINS = ["ops", "attention", "layers", "model"]  # refimpl/X.py has export/X.py


def module_files():
    """{module name: path} for every module of the refformer distribution."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "refformer" and parts:
                continue
            modules[".".join((package, *parts))] = path
    return modules


MODULES = module_files()


def is_package(name):
    return MODULES[name].name == "__init__.py"


def imports(name):
    """[(imported module, lazy)] for module `name`: lazy is True for an import inside a function."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name if is_package(name) else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module
                for alias in child.names:  # `from package import submodule` depends on the submodule
                    found.append((f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def top(module):
    return module.split(".")[0]


def internal(module):
    """The refformer module an import names (a name inside a module maps to that module), or None."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


STDLIB = set(sys.stdlib_module_names)


@pytest.mark.parametrize("module", [f"refformer.refimpl.{m}" for m in MATH])
def test_refimpl_math_imports_only_numpy(module):
    outside = sorted({m for m, _ in imports(module)
                      if not m.startswith("refformer.refimpl") and top(m) not in STDLIB | {"numpy"}})
    assert not outside, f"{module} imports {outside}: the math modules use numpy and the standard library only"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("refformer.refimpl")])
def test_refimpl_never_imports_onnx_export_or_runtime(module):
    allowed = {"numpy", "safetensors", "tokenizers", "sacrebleu", "matplotlib", "ml_dtypes"}  # ml_dtypes: onnx's, bf16
    lazy_only = {"torch", "transformers"}
    for imported, lazy in imports(module):
        if imported.startswith("refformer."):
            assert imported.startswith("refformer.refimpl"), f"{module} imports {imported}"
            continue
        name = top(imported)
        if name in STDLIB or name in allowed:
            continue
        assert name in lazy_only, f"{module} imports {imported}"
        assert lazy, f"{module} imports {imported} at module level: torch and transformers load lazily"
        assert module.startswith(("refformer.refimpl.convert", "refformer.refimpl.training")), \
            f"{module} imports {imported}: only refimpl/convert and refimpl/training may use torch/transformers"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("refformer.export")])
def test_export_never_imports_runtime(module):
    bad = sorted({m for m, _ in imports(module) if m.startswith("refformer.runtime")})
    assert not bad, f"{module} imports {bad}"


def test_no_import_cycles():
    graph = {m: sorted({internal(i) for i, _ in imports(m) if internal(i) and internal(i) != m}) for m in MODULES}
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", FORWARD_TWINS)
def test_each_forward_module_has_its_onnx_twin(name):
    assert f"refformer.refimpl.{name}" in MODULES and f"refformer.export.{name}" in MODULES


def test_the_rules_see_imports():
    """The checker itself: it finds a module-level, a relative and a lazy import where they are known to be."""
    found = dict(imports("refformer.refimpl.model"))
    assert found.get("numpy") is False and "refformer.refimpl.attention" in found
    assert any(lazy for m, lazy in imports("refformer.runtime") if m == "refformer.runtime.generator")


def test_no_private_name_is_imported_across_modules():
    """`from .x import _name` would make a private helper part of another module's contract: make it public."""
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{module}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, offenders


def test_the_search_never_probes_its_stepper():
    """Speed devices plug into refimpl's search through the typed Stepper interface, never by hasattr probing."""
    source = MODULES["refformer.refimpl.generate"].read_text()
    assert "hasattr(" not in source and "getattr(stepper" not in source
