"""Core never imports the tools built on it: `harmonica` without its CLI (`cli/`, `__main__.py`), and the
kernels it uses, load no module of bench, profiling or the CLI, at import or later from inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_FILES = ("__main__.py",)  # and the harmonica/cli folder, which is no core package
# each folder of core and the package name it installs as (setup.py)
CORE_PACKAGES = {"harmonica": "harmonica", "harmonica/adapters": "harmonica.adapters",
                 "harmonica/families": "harmonica.families", "kernels": "harmonica.kernels"}
TOOLS = ("harmonica.bench", "harmonica.profiling", "harmonica.cli", "harmonica.__main__", "bench", "profiling")


def core_files() -> dict:
    """{path: module name} of every core source file."""
    files = {}
    for folder, package in CORE_PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if folder == "harmonica" and path.name in CLI_FILES:
                continue
            files[path] = package if path.stem == "__init__" else f"{package}.{path.stem}"
    return files


def is_tool(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOLS)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list:
    """(line, absolute module name) of every import in `tree`, in functions too: `import a.b`, `from .a import b`
    (as `pkg.a` and `pkg.a.b`) and `importlib.import_module` / `__import__` of a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append((node.lineno, node.args[0].value))
    return names


def tool_imports(path: Path, module: str) -> list:
    """'file:line imports module' for each import of a tool in the source file `path` of core module `module`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for line, name in imported_names(tree, module, path.stem == "__init__") if is_tool(name)]


def test_no_core_source_imports_a_tool():
    files = core_files()
    assert len(files) > 20 and ROOT / "harmonica" / "engine.py" in files and ROOT / "kernels" / "aot.py" in files
    found = [line for path, module in files.items() for line in tool_imports(path, module)]
    assert found == [], "core imports the tools built on it:\n" + "\n".join(found)


@pytest.mark.parametrize("module,source,found", [
    ("harmonica.api", "def f():\n    from .bench.macs import count_macs\n",
     ["harmonica.bench.macs", "harmonica.bench.macs.count_macs"]),
    ("harmonica.api", "from . import cli\n", ["harmonica.cli"]),
    ("harmonica.engine", "from .profiling import nvtx as _nvtx\n", ["harmonica.profiling", "harmonica.profiling.nvtx"]),
    ("harmonica.kernels.aot", "import harmonica.bench.suite\n", ["harmonica.bench.suite"]),
    ("harmonica.families.flux", "from ..bench import table\n", ["harmonica.bench", "harmonica.bench.table"]),
    ("harmonica.api", "import profiling.nvtx\n", ["profiling.nvtx"]),
    ("harmonica.api", "importlib.import_module('harmonica.profiling.nvtx')\n", ["harmonica.profiling.nvtx"]),
    ("harmonica.api", "from .macs import count_macs\nimport benchmark\nfrom . import events\n", []),
])
def test_the_scan_finds_every_form_of_import(module, source, found):
    names = [name for _, name in imported_names(ast.parse(source), module, False) if is_tool(name)]
    assert names == found


def heavy(loaded: list) -> list:
    return [name for name in loaded if name.partition(".")[0] in ("diffusers", "transformers")]


def test_importing_core_loads_no_tool():
    """In a fresh interpreter: `import harmonica`, then every core module; no tool module may be loaded, nor
    diffusers or transformers (a family imports them when it is used). Then the `harmonica` command's parser (every
    subcommand's module): still no diffusers, which costs every call of the command, and every subprocess of this
    suite, about 1.5 s."""
    modules = sorted(core_files().values())
    code = ("import sys, importlib, harmonica\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(' '.join(sys.modules))\n"
            "from harmonica.cli import build_parser\n"
            "build_parser()\n"
            "print(' '.join(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    core, command = (line.split() for line in result.stdout.splitlines())
    assert "harmonica.engine" in core and "harmonica.kernels.aot" in core
    assert [name for name in core if is_tool(name)] == [] and heavy(core) == []
    assert "harmonica.bench.command" in command and "harmonica.profiling.session" in command
    assert heavy(command) == []
