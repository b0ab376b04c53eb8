"""The package's imports flow one way (README "Architecture").

Layers, lowest first; a module imports from its own layer or lower ones only,
at module level or inside a function alike:

    contract/  services/  models/  runtime/  (the app and the task modules)  tools/

Read from the source with ``ast``, so a cycle or an upward import fails here
whether or not anything imports the module at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ourvidz_tasks"
LAYERS = ("contract", "services", "models", "runtime", "", "tools")  # "": the package's own top-level modules
# what the contract layer may import besides the standard library and itself
CONTRACT_THIRD_PARTY = {"pydantic", "pydantic_settings", "pydantic_core"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    inner = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(inner)


def imports(module: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = modules()

    def visit(node: ast.AST, top: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, top
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join([*base, child.module] if child.module else base)
                else:
                    source = child.module or ""
                for alias in child.names:  # `from pkg import module` imports the module
                    candidate = f"{source}.{alias.name}"
                    yield (candidate if candidate in known else source), child.lineno, top
            yield from visit(child, inner)

    yield from visit(tree, True)


def own_graph() -> dict[str, set[str]]:
    found = modules()
    return {m: {target for target, _, _ in imports(m, p) if target in found} for m, p in found.items()}


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)  # raises ValueError on a folder that is not a layer


def test_imports_only_flow_down() -> None:
    upward = []
    found = modules()
    for module, path in found.items():
        for target, line, _ in imports(module, path):
            if target in found and target != module and layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = own_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node == "ourvidz_tasks":
                continue  # a package importing its own submodule is not a cycle
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_contract_is_pydantic_and_the_standard_library() -> None:
    bad = []
    for module, path in modules().items():
        if layer_of(module) != 0:
            continue
        for target, line, _ in imports(module, path):
            top = target.split(".")[0]
            if top in ("ourvidz_tasks", "__future__") or top in sys.stdlib_module_names:
                continue
            if top not in CONTRACT_THIRD_PARTY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "the contract layer imports:\n" + "\n".join(bad)


# what a light install (`pip install .`: no torch, PIL, numpy) runs: publishers, the bridge,
# the outbox consumer, the CLI and Flower (tests/test_light_install.py installs one for real)
LIGHT_FOLDERS = ("contract", "services", "tools")
POOL_ONLY = {"ourvidz_tasks.services.media", "ourvidz_tasks.services.fetch",
             "ourvidz_tasks.tools.gpucheck", "ourvidz_tasks.tools.gpubench"}
LIGHT_EXTRA = ["ourvidz_tasks", "ourvidz_tasks.celery", "ourvidz_tasks.celeryconfig", "ourvidz_tasks.outbox", "ourvidz_tasks.publish",
               "ourvidz_tasks.models.memplan", "ourvidz_tasks.models.sizes", "ourvidz_tasks.runtime.ledger"]
BLOCKED = ("torch", "diffusers", "transformers", "accelerate", "compel", "PIL", "numpy", "cv2", "imageio_ffmpeg")


def light_modules() -> list[str]:
    inside = [m for m in modules() if m.split(".")[1:2] and m.split(".")[1] in LIGHT_FOLDERS]
    return sorted(set(inside + LIGHT_EXTRA) - POOL_ONLY)


def test_the_light_modules_import_without_torch_pil_or_numpy() -> None:
    """Imported in a fresh interpreter in which those packages cannot be found."""
    script = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BLOCKED!r}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "failed = []\n"
        f"for name in {light_modules()!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_the_package_never_imports_the_development_tools() -> None:
    found = modules()
    leaks = [f"{module} imports {target}" for module, path in found.items()
             for target, _, _ in imports(module, path) if target.split(".")[0] in ("devtools", "tests", "bench")]
    assert not leaks


@pytest.mark.parametrize("folder", ["tests"])
def test_test_modules_do_not_import_each_other(folder: str) -> None:
    crossing = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_"):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert not crossing, "\n".join(crossing)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a contract module importing the runtime is caught."""
    path = PACKAGE / "contract" / "errors.py"
    fake = list(imports("ourvidz_tasks.contract.errors", path))
    assert all(layer_of(t) == 0 for t, _, _ in fake if t in modules())
    probe = tmp_path / "probe.py"
    probe.write_text("from ..runtime import recovery\n")
    found = [t for t, _, _ in imports("ourvidz_tasks.contract.probe", probe)]
    assert found == ["ourvidz_tasks.runtime.recovery"]
    assert layer_of(found[0]) > layer_of("ourvidz_tasks.contract.probe")
