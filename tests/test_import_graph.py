"""The package's shape: no import cycle (imports inside functions count), `sde_diffusion.config` imports neither
networks nor data code, and no function of the jobs is longer than JOB_FUNCTION_LINES."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sde_diffusion", "evaluation")
TOP_MODULES = ("run_lib", "main")
JOB_FUNCTION_LINES = 60


def module_files() -> Dict[str, Path]:
    """Dotted module name → file, for every module of the packages and the top-level scripts."""
    files = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(name: str, path: Path, modules) -> List[str]:
    """Every module `path` imports, anywhere in it (functions included), relative imports resolved. `from X import
    y` imports the submodule X.y where there is one, else (a name defined in X) X itself; the parent packages that
    Python also initializes are not counted, as for every submodule."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {name: {target for target in imported_names(name, path, files) if target in files and target != name}
            for name, path in files.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle [a, b, ..., a] of the directed graph, or None (depth-first search with colours)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_relative_imports():
    graph = import_graph()
    assert "sde_diffusion.validation" in graph["sde_diffusion.config"]  # inside validate_config
    assert "sde_diffusion.data.image_folder" in graph["sde_diffusion.data.datasets"]  # inside get_dataset
    assert "sde_diffusion.models.registry" in graph["sde_diffusion.models"]  # from .registry import ...
    assert "sde_diffusion.sdes" in graph["sde_diffusion.models.score_fn"]  # from ..sdes import ...
    assert "sde_diffusion.jobs.train" in graph["run_lib"]


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_errors_is_a_leaf():
    assert not import_graph()["sde_diffusion.errors"]


def test_importing_the_config_loads_no_networks_and_no_data_code():
    code = ("import sys, sde_diffusion.config; "
            "print(sorted(m for m in sys.modules if m.startswith('sde_diffusion')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = set(ast.literal_eval(loaded.stdout.strip()))
    assert "sde_diffusion.config" in modules
    data_code = {m for m in modules if m == "sde_diffusion.data" or m.startswith("sde_diffusion.data.")}
    data_code |= {"sde_diffusion.toy"} & modules
    networks = {m for m in modules if m == "sde_diffusion.models" or m.startswith("sde_diffusion.models.")}
    assert not networks and not modules & data_code, sorted(modules)


def long_functions(path: Path, limit: int) -> List[str]:
    """'file:line name (n lines)' for each function or method of path longer than limit lines (decorators and
    docstring included, nested functions counted in their parent)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > limit:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_long_functions_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    (tmp_path / "f.py").write_text(f"def short():\n    pass\n\n\n@decorated\ndef longer():\n{body}\n")
    assert long_functions(tmp_path / "f.py", 6) == ["f.py:6 longer (7 lines)"]
    assert long_functions(tmp_path / "f.py", 7) == []


def test_no_job_function_is_longer_than_the_limit():
    files = [ROOT / "run_lib.py", *sorted((ROOT / "sde_diffusion" / "jobs").glob("*.py"))]
    assert len(files) >= 8  # run_lib, the package, the builder, generation and five jobs
    too_long = [entry for path in files for entry in long_functions(path, JOB_FUNCTION_LINES)]
    assert not too_long, f"functions over {JOB_FUNCTION_LINES} lines: {too_long}"
