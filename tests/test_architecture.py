"""docs/ARCHITECTURE.md stays true: imports inside maskstudio/ flow one way, in the order it lists.

The document's "Import order" block lists every module, bottom first. A module may import only
modules listed above it (lazy imports inside functions count too), so there is no cycle and
nothing reaches back up. Every module must be listed, so a new file has to take its place.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "maskstudio"


def documented_order() -> list[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"## Import order.*?```text\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md needs an '## Import order' section with a ```text block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _resolve(mod_parts: list[str], names, known: set[str]) -> set[str]:
    """`from <mod> import <names>`: a name that is a submodule counts as that module."""
    mod = ".".join(mod_parts)
    out = set()
    for name in names:
        cand = f"{mod}.{name}" if mod else name
        out.add(cand if cand in known else (mod or "__init__"))
    return out


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """maskstudio modules that `path` imports anywhere (top level or inside functions)."""
    here = module_name(path)
    own = [] if here == "__init__" else here.split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            found |= _resolve(base + (node.module.split(".") if node.module else []), names, known)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "maskstudio":
            found |= _resolve(node.module.split(".")[1:], names, known)
        elif isinstance(node, ast.Import):
            found |= {name.split(".", 1)[1] if "." in name else "__init__"
                      for name in names if name.split(".")[0] == "maskstudio"}
    found.discard(here)
    return found


def test_every_module_is_in_the_documented_order():
    order = documented_order()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert len(order) == len(set(order)), "a module is listed twice"
    assert modules == set(order), (f"not documented: {sorted(modules - set(order))}; "
                                   f"documented but missing: {sorted(set(order) - modules)}")


def test_imports_only_reach_down():
    order = documented_order()
    rank = {m: i for i, m in enumerate(order)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target in imported_modules(path, set(rank)):
            assert target in rank, f"{here} imports unknown module {target}"
            if rank[target] >= rank[here]:
                upward.append(f"{here} -> {target}")
    assert not upward, "imports that reach up (or sideways) against docs/ARCHITECTURE.md: " + ", ".join(upward)


def test_no_file_is_too_long():
    long_files = {module_name(p): n for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    long_files.update({"app.py": n} if (n := len((ROOT / "app.py").read_text().splitlines())) > 600 else {})
    assert not long_files, f"files over 600 lines: {long_files}"


def test_app_half_functions_are_short():
    """No function of the app half (app.py, the studio handlers, runs, pictures) over 80 lines."""
    files = [ROOT / "app.py", *[p for part in ("studio", "run", "viz") for p in sorted((PACKAGE / part).glob("*.py"))]]
    long_functions = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 80:
                    long_functions.append(f"{path.name}:{node.name} ({size} lines)")
    assert not long_functions, long_functions
