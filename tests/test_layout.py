"""The repository's shape: the five files at the top, the library they use in genedml/, what measures the
method in experiments/; imports run one way (no circle); CI installs every optional extra a test would
otherwise skip without."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIVE = {"model", "losses", "data", "train", "evaluate"}


def modules() -> dict[str, Path]:
    """Every module of the project by its import name: "model", "genedml.cache", "experiments.benchmark"."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in ("genedml", "experiments"):
        found |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return found


def imported(tree, names: set, module_level: bool) -> set:
    """The project's modules an AST imports: everywhere, or at module level only (not inside functions)."""
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in names:                                    # from genedml.cache import ArrayCache
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & names  # from genedml import cache
    return found


def project_imports(module_level: bool = False) -> dict[str, set]:
    """module -> the project's modules it imports (anywhere in the file, lazily or not; or at module level)."""
    mods = modules()
    return {m: imported(ast.parse(p.read_text()), set(mods), module_level) - {m} for m, p in mods.items()}


def closure(graph, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(graph[m])
    return seen


def test_the_top_level_holds_the_five_files_only():
    assert {p.stem for p in ROOT.glob("*.py")} == FIVE
    assert (ROOT / "genedml" / "__init__.py").is_file() and (ROOT / "experiments" / "__init__.py").is_file()


def test_imports_run_one_way():
    graph, state = project_imports(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    library = {m for m in graph if m.startswith("genedml.")}
    for m in sorted(library):  # the library the five use imports none of them
        assert not graph[m] & FIVE, f"{m} imports {sorted(graph[m] & FIVE)}: genedml/ must not import the five files"
    for m in sorted(FIVE | library):  # what measures the method is imported by nothing (tests aside)
        assert not {d for d in graph[m] if d.startswith("experiments.")}, f"{m} imports experiments/"
    # the layers a reader relies on: data never needs the model, evaluate never needs train
    assert not graph["data"] & {"model", "evaluate", "train"}
    assert not graph["evaluate"] & {"train"}
    # a reader re-derives Gene-DML from model.py and losses.py alone: the model leans only on the trunk
    # (torchvision's ResNet18) and the global level's batched form, and these on nothing of ours
    assert graph["model"] <= {"genedml.trunk", "genedml.packing"} and not graph["losses"]
    assert not graph["genedml.trunk"] and not graph["genedml.packing"]
    assert not graph["genedml.cohorts"]  # the published cohorts' readers; visium registers its own through hooks
    assert graph["genedml.slide"] <= {"genedml.cohorts"} and not graph["genedml.h5ad"]  # slides: the lattices pitch; AnnData: nothing of ours
    assert not graph["genedml.prediction"] & {"genedml.demo", "genedml.features"}
    # cohorts dispatches to cohort tables through the hooks visium registers, never by importing it
    assert graph["genedml.visium"] <= {"genedml.cohorts", "genedml.cache", "genedml.crops", "genedml.slide", "genedml.visium_files"}
    assert graph["genedml.visium_files"] <= {"genedml.cohorts", "genedml.slide"}
    assert not any("genedml.visium" in graph[m] for m in ("genedml.cohorts", "data", "model", "genedml.features"))


def test_training_loads_only_what_it_runs():
    """train.py's module-level imports (what `python train.py` loads before it reads a flag) leave out what
    only one path needs: Visium tables, whole slides, AnnData, the demo generator, the downloader, prediction."""
    loaded = closure(project_imports(module_level=True), "train")
    only_one_path = {"genedml.visium", "genedml.visium_files", "genedml.slide", "genedml.h5ad", "genedml.demo",
                     "genedml.download", "genedml.prediction"}
    assert not loaded & only_one_path, f"train.py loads {sorted(loaded & only_one_path)} at import"


def test_ci_installs_every_optional_extra_the_tests_skip_without():
    """A test that skips without a package (pytest.importorskip) only runs in CI if the package is in
    requirements-extras.txt and .ci/run installs that file after requirements.txt."""
    skipped_without = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                skipped_without.add(node.args[0].value.split(".")[0])
    skipped_without -= {m.split(".")[0] for m in modules()}
    required = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    skipped_without -= {l.split(">")[0].split("=")[0].split("<")[0].strip().lower() for l in required if l} | {"PIL"}
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements-extras.txt").read_text().splitlines()]
    extras = [l.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_") for l in lines if l]
    steps = (ROOT / ".ci" / "run").read_text()
    own_env = {"anndata", "scanpy", "squidpy"}  # anndata caps pandas below 3: .ci/run gives their tests an environment of their own
    for module in sorted(skipped_without - own_env):  # an import name starts its package's name (openslide-python)
        assert any(p.startswith(module.lower()) for p in extras), f"{module}: not in requirements-extras.txt"
    for module in own_env:
        assert f" {module} " in steps, f"{module}: .ci/run installs it nowhere"
    assert "-r requirements-extras.txt" in steps
    assert steps.index("-r requirements.txt") < steps.index("-r requirements-extras.txt") < steps.index("pytest -q tests")
