"""The layout's import rules, checked in a fresh interpreter: the pure subpackages import no Lightning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lightning_compress

PACKAGE = Path(lightning_compress.__file__).parent
PURE = ("core", "pruning", "structure", "quantization", "serving", "qat", "adaptive")


def _modules(subpackage: str) -> list[str]:
    root = PACKAGE / subpackage
    return sorted(
        f"lightning_compress.{subpackage}." + p.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for p in root.rglob("*.py")
        if p.name != "__init__.py"
    )


@pytest.mark.parametrize("subpackage", [p for p in PURE if (PACKAGE / p).is_dir()])
def test_pure_subpackages_import_no_lightning(subpackage: str) -> None:
    modules = _modules(subpackage)
    assert modules, subpackage
    code = (
        "import sys, importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "print(','.join(bad))\n"
    )
    # import the subpackage without running lightning_compress/__init__ (which imports the callbacks)
    bootstrap = (
        "import importlib.util, sys, types\n"
        f"pkg = types.ModuleType('lightning_compress'); pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['lightning_compress'] = pkg\n"
    )
    result = subprocess.run([sys.executable, "-c", bootstrap + code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{subpackage} pulls in {result.stdout.strip()}"


def test_no_package_module_is_over_350_lines() -> None:
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > 350}
    assert long == {}
