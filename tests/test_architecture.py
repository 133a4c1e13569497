"""Structural rules of the package: no import cycles among the model adapters, no private names across modules."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cli" / "stepopt"
DIFFUSERS = ("common", "pixel", "latent")


def _imports(path: Path) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ImportFrom)]


def test_no_private_names_imported_across_stepopt_modules() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        for node in _imports(path):
            if (node.module or "").startswith("stepopt"):
                bad += [
                    f"{path.relative_to(PKG)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert bad == []


def test_diffusers_package_imports_only_downward() -> None:
    """common <- pixel <- latent <- package: no module imports one that comes after it (no cycle)."""
    order = {name: i for i, name in enumerate(DIFFUSERS)}
    for name in DIFFUSERS:
        for node in _imports(PKG / "models" / "diffusers" / f"{name}.py"):
            mod = node.module or ""
            assert mod != "stepopt.models.diffusers", f"{name} imports its own package"
            if mod.startswith("stepopt.models.diffusers."):
                assert order[mod.rsplit(".", 1)[1]] < order[name], f"{name} imports {mod}"


def test_models_package_has_no_bottom_of_file_import() -> None:
    tree = ast.parse((PKG / "models" / "__init__.py").read_text(encoding="utf-8"))
    seen_def = False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            seen_def = True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            assert not seen_def, f"module-level import after a definition at line {node.lineno}"


@pytest.mark.parametrize("module", [f"stepopt.models.diffusers.{m}" for m in DIFFUSERS])
def test_each_diffusers_module_imports_first(module: str) -> None:
    """Any module of the package can be the first one imported (what a cycle would break)."""
    code = f"import {module}; import stepopt.models; assert 'diffusers' in stepopt.models.LOADERS"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(PKG.parent)})


def test_no_references_to_documents_outside_the_repository() -> None:
    root = PKG.parents[1]
    names = [n + ".md" for n in ("design", "methods", "style")] + ["../" + "shared"]
    files = [root / "README.md", *[p for d in ("cli", "tests", "scripts", "configs") for p in (root / d).rglob("*")]]
    bad = []
    for path in files:
        if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".toml", ".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            bad += [f"{path.relative_to(root)}: {n}" for n in names if n in text]
    assert bad == []


def test_models_are_not_probed_for_capabilities() -> None:
    """Capabilities are members of DiffusionModel; no getattr/hasattr probes on models, no isinstance in the CLI."""
    bad = []
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for probe in ("getattr(model,", "hasattr(model,", "getattr(m,", "hasattr(m,", "getattr(ctx.model,"):
            if probe in text:
                bad.append(f"{path.relative_to(PKG)}: {probe}")
        if path.parent.name == "cli" and "isinstance(m, Diffusers" in text:
            bad.append(f"{path.relative_to(PKG)}: isinstance on a model class")
    assert bad == []


def test_optimizers_build_start_grids_in_one_place() -> None:
    """Start grids on a model's sigma range come from stepopt.baselines.start_sigmas, not ad-hoc calls."""
    ad_hoc = [
        str(p.relative_to(PKG))
        for p in (PKG / "optimizers").rglob("*.py")
        if ".sigma_max, " in p.read_text(encoding="utf-8") and "baseline_sigmas(" in p.read_text(encoding="utf-8")
    ]
    assert ad_hoc == []


def _raised_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string parts of every ``raise X(...)`` and ``report(...)`` message in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        call = node.exc if isinstance(node, ast.Raise) else node if isinstance(node, ast.Call) else None
        if not isinstance(call, ast.Call):
            continue
        if isinstance(node, ast.Call) and not (isinstance(call.func, ast.Attribute) and call.func.attr == "report"):
            continue
        for arg in [*call.args, *(k.value for k in call.keywords)]:
            for c in ast.walk(arg):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    out.append((c.lineno, c.value))
    return out


def test_library_errors_name_parameters_not_flags() -> None:
    """Library messages name parameters (in backticks); only the command line (stepopt.cli) names flags."""
    flag = re.compile(r"(?<![\w-])--[a-z]")
    bad = [
        f"{p.relative_to(PKG)}:{line}: {text}"
        for p in PKG.rglob("*.py")
        if "cli" not in p.relative_to(PKG).parts
        for line, text in _raised_text(p)
        if flag.search(text)
    ]
    assert bad == []


def test_the_command_line_shows_flags_for_parameters() -> None:
    import doctest

    import stepopt.cli.flags

    assert doctest.testmod(stepopt.cli.flags).failed == 0
    from stepopt.cli.flags import cli_message

    shown = cli_message("`trust_code` and `prompt_file`, not `lr_theta`")
    assert shown == "--trust-code and --prompt-file, not `lr_theta`"
