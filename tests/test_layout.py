"""The package's layout holds: imports only point down, and `import reparam` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reparam"

# Each layer may import the layers listed for it (and itself), nothing above.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "families": {"core"},
    "engine": {"core"},
    "models": {"core", "engine"},
    "checkpoints": {"core", "families", "models"},
    "graph": {"core", "checkpoints"},  # checkpoints: write_atomic and message helpers
    "export": {"core", "models", "checkpoints"},
    "analysis": {"core", "families", "models", "checkpoints", "export", "graph"},
    "cli": {
        "core",
        "families",
        "engine",
        "models",
        "checkpoints",
        "graph",
        "export",
        "analysis",
        "top level",
    },
}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _reparam_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names) for every import of a reparam module in ``path``."""
    tree = ast.parse(path.read_text())
    package = ".".join(("reparam", *path.relative_to(PACKAGE).with_suffix("").parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return [(module, names) for module, names in found if module.split(".")[0] == "reparam"]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


MODULES = sorted(
    path for path in PACKAGE.rglob("*.py") if _layer(path) in ALLOWED and path.name != "__init__.py"
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    for module, names in _reparam_imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else "reparam"
        if target in ("reparam", "fuse_block"):
            target = "top level"
        assert target == layer or target in ALLOWED[layer], (
            f"{path.relative_to(PACKAGE)} ({layer}) imports {module}: {layer} may import "
            f"{sorted(ALLOWED[layer]) or 'nothing else'}"
        )
        if target != layer:
            private = [part for part in (*parts[2:], *names) if _is_private(part)]
            assert not private, f"{path.relative_to(PACKAGE)} imports private {module} {names}"


def test_every_module_belongs_to_a_layer() -> None:
    top = {path.name for path in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "cli.py", "fuse_block.py"}, sorted(top)
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"a subpackage without a layer: {packages - set(ALLOWED)}"


def _loaded_by(code: str) -> set[str]:
    """Modules that ``code`` loads: ``-X importtime``'s report, plus ``sys.modules`` at the end.

    (importtime only sees import statements, not ``importlib.import_module``.)
    """
    probe = f"{code}\nimport sys\nprint(' '.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    timed = {
        line.split("|")[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return timed | set(result.stdout.split())


def test_import_reparam_for_fuse_block_stays_light() -> None:
    loaded = _loaded_by("import reparam; reparam.fuse_block")
    assert "reparam.core.fusion" in loaded, "the probe must see reparam's own modules"
    heavy = {
        module
        for module in loaded
        if module.startswith(("reparam.engine", "reparam.checkpoints", "reparam.export"))
        or module in {"threading", "mmap", "torch", "safetensors", "onnx"}
    }
    assert not heavy, f"import reparam loaded {sorted(heavy)}"


def test_import_reparam_dot_fuse_block_is_the_function() -> None:
    code = (
        "import reparam.fuse_block\n"
        "import numpy as np\n"
        "from reparam import fuse_block, BatchNorm\n"
        "assert callable(reparam.fuse_block) and reparam.fuse_block is fuse_block\n"
        "bn = BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), eps=0.0)\n"
        "kernel, bias = reparam.fuse_block((np.zeros((2, 2, 3, 3)), bn), identity=bn)\n"
        "print(kernel[:, :, 1, 1].tolist())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[1.0, 0.0], [0.0, 1.0]]", result.stdout


def test_lazy_subpackages_load_on_access() -> None:
    loaded = _loaded_by("import reparam; reparam.families.from_state_dict; reparam.load")
    assert {"reparam.families", "reparam.checkpoints"} <= loaded, sorted(loaded)
