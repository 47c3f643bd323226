"""The library/trainer split users rely on: the math, the model, the metrics and the loop import without Ray or
the media decoders (notebooks, torchrun, other trainers)."""

import ast
import subprocess
import sys
from pathlib import Path

LIBRARY = [
    "gram_ray.volume",
    "gram_ray.loss",
    "gram_ray.model",
    "gram_ray.model.gram",
    "gram_ray.model.checkpoint",
    "gram_ray.retrieval.metrics",
    "gram_ray.retrieval.rerank",
    "gram_ray.train.loop",
    "gram_ray.data.collate",
]


def test_library_and_loop_import_without_ray_or_decoders():
    code = (
        f"import sys\nfor m in {LIBRARY!r}: __import__(m)\n"
        "print(sorted(m for m in ('ray', 'av', 'decord', 'torchaudio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- the package's shape: no import circles, the top level, who may import the benchmarks -----------------------

PACKAGE = Path(__file__).resolve().parents[1] / "gram_ray"
TOP_LEVEL = {
    # the Ray-free math, tracking, the list of private uses, and the two entry points that are not commands; the
    # config, storage and the rest are packages
    "modules": {"__init__", "__main__", "volume", "loss", "matching", "distributed", "private_uses"}
    | {"tracking", "tune", "demo"},
    "packages": {"config", "storage", "data", "model", "train", "retrieval", "cluster", "bench", "cli"},
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every gram_ray module `path` imports, at the top or inside a function (a lazy import is still a dependency):
    `from gram_ray.a import b` names gram_ray.a.b when that is a module, else gram_ray.a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gram_ray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gram_ray"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found & known


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(path, set(names)) - {name} for name, path in names.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (circle := visit(other)):
                return circle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name)):
            return circle
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def unit_of(module: str) -> str:
    """The package (gram_ray.train) or top-level module (gram_ray.storage) a module belongs to."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, deps in import_graph().items():
        graph.setdefault(unit_of(name), set()).update(unit_of(d) for d in deps)
    return {unit: deps - {unit} for unit, deps in graph.items()}


def test_no_import_circles_between_packages():
    """A package's modules may import each other freely; between packages (and top-level modules) the imports
    go one way: e.g. training imports retrieval's embedding, retrieval never imports training."""
    circle = find_circle(package_graph())
    assert circle is None, "import circle between packages: " + " -> ".join(circle)


def test_the_config_is_the_root_and_imports_nothing_else_of_gram_rays():
    outside = {
        (name, dep)
        for name, deps in import_graph().items()
        if unit_of(name) == "gram_ray.config"
        for dep in deps
        if unit_of(dep) != "gram_ray.config"
    }
    assert outside == set()


def test_the_configs_modalities_are_the_data_contracts():
    from gram_ray.config import MODALITY_NAMES
    from gram_ray.data.schema import MODALITIES

    assert tuple(MODALITIES) == MODALITY_NAMES


def test_top_level_holds_the_math_config_entry_points_and_packages():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL["modules"] and packages == TOP_LEVEL["packages"]


def test_only_the_cli_imports_the_benchmarks():
    users = {
        name
        for name, deps in import_graph().items()
        if any(d == "gram_ray.bench" or d.startswith("gram_ray.bench.") for d in deps)
    }
    assert {u for u in users if not u.startswith(("gram_ray.bench", "gram_ray.cli"))} == set()


def test_command_modules_do_not_import_the_group_that_registers_them():
    graph = import_graph()
    for name in (
        "gram_ray.cli.commands",
        "gram_ray.cli.cluster",
        "gram_ray.cli.bench",
        "gram_ray.cli.common",
        "gram_ray.cli.config_reference",
    ):
        assert "gram_ray.cli" not in graph[name], name
