"""DESIGN.md's dependency order: a package imports only packages listed above it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ORDER = [
    "kernels", "model", "tokenizer", "data", "checkpoint", "parallel", "train", "compress", "export",
    "finetune", "federated", "engine", "serve", "plan", "report", "cli",
]  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src" / "lmscale"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lmscale" and len(parts) > 1 else None


@pytest.mark.parametrize("package", [p for p in ORDER if (SRC / p).is_dir()])
def test_imports_follow_the_design_order(package):
    allowed = set(ORDER[: ORDER.index(package) + 1])
    for path in (SRC / package).rglob("*.py"):
        if path.name == "__main__.py":  # `python -m lmscale.X` entry points call the CLI
            continue
        for module in imported_modules(path):
            target = package_of(module)
            if target in ORDER:
                assert target in allowed, f"{path.relative_to(SRC)} imports {module}"


def test_model_code_is_pure():
    for path in (SRC / "model").rglob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith("torch.distributed"), f"{path.name} imports {module}"
            assert module not in ("argparse", "safetensors", "json"), (
                f"{path.name} imports {module}"
            )


def test_transformers_is_never_a_runtime_dependency():
    for path in SRC.rglob("*.py"):
        assert not any(m.split(".")[0] == "transformers" for m in imported_modules(path)), path


def test_import_lmscale_loads_no_torch():
    code = "import sys, lmscale; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
