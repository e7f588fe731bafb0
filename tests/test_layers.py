"""The layers run one way (docs/architecture.md): import-linter's contracts in pyproject.toml hold, a broken
one fails the check, and no import of a draftsmith module hides inside a function to dodge them."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]      # the repository root is the package
LIBRARY = ("models", "eval", "distill", "train")   # where a function-body import is counted
MAX_FUNCTION_IMPORTS = 3
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint(package_parent: Path, config: Path) -> subprocess.CompletedProcess:
    """import-linter over the `draftsmith` found first on the path (an installed one unless PYTHONPATH says)."""
    env = None
    if package_parent != ROOT:
        env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    result = lint(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout, result.stdout


def test_a_broken_layer_fails_the_check(tmp_path):
    """A drafter kind that imports the decoder, even inside a function, breaks the layers contract."""
    package = tmp_path / "draftsmith"
    package.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, package / f.name)
    for sub in ROOT.iterdir():
        if (sub / "__init__.py").is_file():    # the subpackages (tests/ and bench/ are none)
            shutil.copytree(sub, package / sub.name, ignore=shutil.ignore_patterns("__pycache__"))
    kind = package / "models" / "prompt_lookup.py"
    kind.write_text(kind.read_text() + "\n\ndef _upward():\n    from draftsmith.eval.decoder import NoDraft\n\n"
                                       "    return NoDraft\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = lint(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0, result.stdout + result.stderr
    assert "draftsmith.models.prompt_lookup -> draftsmith.eval.decoder" in result.stdout, result.stdout


def function_body_imports(path: Path) -> list[int]:
    """Lines of `from draftsmith... import` / `import draftsmith.<module>` statements inside a function.
    `import draftsmith` alone (the root package: its version) is loaded before any module of it, so it
    cannot close a cycle, and is not counted."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").split(".")[0] == "draftsmith"):
                lines.append(inner.lineno)
            elif isinstance(inner, ast.Import) and any(a.name.startswith("draftsmith.") for a in inner.names):
                lines.append(inner.lineno)
    return sorted(set(lines))


def test_few_function_body_imports_each_with_its_reason():
    found = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text().splitlines()
            for line in function_body_imports(path):
                said = "#" in source[line - 1] or source[line - 2].strip().startswith("#")
                found.append((f"{path.relative_to(ROOT)}:{line}", said))
    assert len(found) <= MAX_FUNCTION_IMPORTS, (
        f"{len(found)} draftsmith imports inside functions (at most {MAX_FUNCTION_IMPORTS}): {[f for f, _ in found]}. "
        "Import at the top of the module; if that makes a cycle, move the shared type below both (docs/architecture.md)")
    unsaid = [f for f, said in found if not said]
    assert not unsaid, f"a function-body import without a comment saying why: {unsaid}"
