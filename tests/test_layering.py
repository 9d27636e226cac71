"""The import direction of DESIGN.md, read statically from the source (every import statement,
including those inside functions and under TYPE_CHECKING):

- the engine side (engine, models, layers, kernels and all they import, transitively) never
  reaches the front-ends: chat/, serve/, cli/, api.py;
- the serve package has no import cycle between its modules.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "litedeploy"
ENGINE_SIDE = ("litedeploy.engine", "litedeploy.models", "litedeploy.layers", "litedeploy.kernels")
FRONT_ENDS = ("litedeploy.chat", "litedeploy.serve", "litedeploy.cli", "litedeploy.api")


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


@cache
def imports_of(module: str) -> frozenset[str]:
    """The litedeploy modules `module` names in any import statement. `from pkg import name` is
    an edge to pkg.name when that is a module, else to pkg."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return frozenset(name for name in found if name in MODULES and name != module)


def _reachable(start: list[str]) -> dict[str, str]:
    """Every module reachable from `start`, mapped to the module that first imported it."""
    parent = {name: "" for name in start}
    todo = list(start)
    while todo:
        module = todo.pop()
        for name in sorted(imports_of(module)):
            if name not in parent:
                parent[name] = module
                todo.append(name)
    return parent


def _chain(parent: dict[str, str], module: str) -> str:
    chain = [module]
    while parent[chain[-1]]:
        chain.append(parent[chain[-1]])
    return " <- ".join(chain)


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_walker_sees_known_edges():
    # a walker that finds nothing would pass everything below
    assert "litedeploy.model_bundle" in imports_of("litedeploy.engine.engine")
    assert "litedeploy.kernels" in imports_of("litedeploy.layers.norm")  # from litedeploy import
    assert "litedeploy.serve.handlers" in imports_of("litedeploy.serve.openai_server")
    assert "litedeploy.serve.debug" in imports_of("litedeploy.serve.openai_server")  # in a function
    assert "litedeploy.chat.template" in imports_of("litedeploy.chat.prompt")


def test_engine_side_never_imports_the_front_ends():
    start = [name for name in MODULES if _in(name, ENGINE_SIDE)]
    parent = _reachable(start)
    assert "litedeploy.model_bundle" in parent
    leaks = [_chain(parent, name) for name in parent if _in(name, FRONT_ENDS)]
    assert not leaks, "the engine side reaches front-end modules:\n" + "\n".join(leaks)


def test_serve_modules_import_no_cycle():
    serve = sorted(name for name in MODULES if _in(name, ("litedeploy.serve",)))
    assert "litedeploy.serve.state" in serve
    edges = {name: sorted(n for n in imports_of(name) if n in serve) for name in serve}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in edges[module]:
            if state.get(name) == 1:
                cycle = path[path.index(name):] + [name]
                raise AssertionError("serve import cycle: " + " -> ".join(cycle))
            if name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in serve:
        if module not in state:
            visit(module, [module])
