"""The package's layers point one way: core <- models <- engine <- experiments <- commands <- cli.

Every `import lors.X` / `from lors.X import` in src/lors (at module level or inside a function)
is read with `ast`; a module may import its own layer or any layer below it, never above.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lors"
ROOT = SRC.parents[1]
# the layer of each top-level name under lors (a package or a module); higher imports lower
LAYERS = {
    "core": 0, "config": 0, "serialization": 0, "hf": 0,
    "models": 1, "adapters": 1, "data": 1,
    "engine": 2,
    "experiments": 3,
    "commands": 4,
    "cli": 5, "__main__": 5, "__init__": 5,
}


def _lors_imports(path: Path) -> set[str]:
    """The top-level lors sub-package or module of every lors import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "lors"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lors" and len(parts) > 1:
                found.add(parts[1])
    return found


def _layer_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else path.stem


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_layer_of(p) for p in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_layer_above_its_own(path):
    own = LAYERS[_layer_of(path)]
    above = sorted(m for m in _lors_imports(path) if m in LAYERS and LAYERS[m] > own)
    assert not above, f"{path.relative_to(SRC)} (layer {own}) imports {above} from above it"


def test_core_imports_torch_and_the_standard_library_only():
    import sys
    for path in (SRC / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    assert top in ("torch", "lors", "__future__") or top in sys.stdlib_module_names, (path, name)
                    if top == "lors":
                        assert name.startswith("lors.core"), (path, name)


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_do_not_import_commands(folder):
    for path in (ROOT / folder).rglob("*.py"):
        assert "commands" not in _lors_imports(path), f"{path.relative_to(ROOT)} imports lors.commands"


def _calls(path: Path, dotted: str) -> int:
    """How many calls of ``dotted`` (e.g. "torch.optim.AdamW") ``path`` makes, read with ast."""
    found = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (dotted, dotted.rsplit(".", 1)[1]):
            found += 1
    return found


def test_adamw_is_built_in_one_place():
    """docs/architecture.md: `lors.engine.loop.adamw` is the one AdamW builder."""
    builders = [p.relative_to(SRC).as_posix() for p in MODULES if _calls(p, "torch.optim.AdamW")]
    assert builders == ["engine/loop.py"]


def _optimizer_steps(path: Path) -> int:
    """Calls of ``<optimiser>.step(...)`` in ``path``: on an object named opt, optimizer (or
    optimiser), or a gradient scaler's ``scaler.step(optimizer)``."""
    return sum(1 for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step"
               and ast.unparse(node.func.value).split(".")[-1] in ("opt", "optimizer", "optimiser", "scaler"))


def test_every_training_steps_its_optimiser_in_the_engine_loop():
    """docs/architecture.md: `lors.engine.loop.train_one_epoch` is the training loop of every
    training in the project (detector, backbone pretraining, GPT, ViT, fine-tuning, uptraining)."""
    steppers = [p.relative_to(SRC).as_posix() for p in MODULES if _optimizer_steps(p)]
    assert steppers == ["engine/loop.py"]


def _own_nodes(scope: ast.AST):
    """The nodes of ``scope``'s own body: not those of the functions, lambdas or classes inside it."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _mode_restores(path: Path) -> int:
    """Save-and-restore of a module's train/eval mode in ``path``, read with ast: a function (or
    the module's top level) that calls ``X.eval()`` and, on a later line, ``X.train(...)`` on the
    same ``X`` (``model.eval()`` ... ``model.train(was_training)``)."""
    found = 0
    for scope in ast.walk(ast.parse(path.read_text())):
        if not isinstance(scope, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines: dict[tuple[str, str], list[int]] = {}
        for node in _own_nodes(scope):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("eval", "train"):
                lines.setdefault((ast.unparse(node.func.value), node.func.attr), []).append(node.lineno)
        found += sum(1 for (x, attr), at in lines.items()
                     if attr == "eval" and (x, "train") in lines and min(at) < max(lines[x, "train"]))
    return found


def test_train_eval_mode_is_saved_and_restored_in_one_place():
    """docs/architecture.md: `lors.engine.loop.evaluating` is the one save-and-restore of a
    model's train/eval mode around an evaluation. `count_macs` (models/, which may not import
    the engine) writes it out once, as the one exception."""
    homes = {p.relative_to(SRC).as_posix() for p in MODULES if _mode_restores(p)}
    assert homes == {"engine/loop.py", "models/adamixer/report.py"}
