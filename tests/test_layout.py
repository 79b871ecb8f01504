"""The repository's shape: imports between the project's modules run one way (no circle), and CI
installs every optional extra a test would otherwise skip without."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_imports():
    """module -> the project's modules it imports (anywhere in the file, lazily or not)."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for path in ROOT.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names} & modules
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in modules:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_imports_have_no_circle():
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
    # the layers a reader relies on: data never needs the model, evaluate never needs train
    assert not graph["data"] & {"model", "features", "evaluate", "train", "demo"}
    assert not graph["evaluate"] & {"train", "demo", "experiments", "benchmark"}
    # a reader re-derives Gene-DML from model.py and losses.py alone: the model leans only on the trunk
    # (torchvision's ResNet18) and the global level's packed layout, and these on nothing of ours
    assert graph["model"] <= {"trunk", "packing"} and not graph["losses"]
    assert not graph["trunk"] and not graph["packing"]
    assert not graph["cohorts"]  # the published cohorts' readers; visium.py registers its own through hooks
    assert not graph["slide"] and not graph["h5ad"]  # reading slides and writing AnnData need nothing of ours
    assert not graph["prediction"] & {"evaluate", "train", "demo", "features", "model"}


def test_ci_installs_every_optional_extra_the_tests_skip_without():
    """A test that skips without a package (pytest.importorskip) only runs in CI if the package is in
    requirements-extras.txt and .ci/run installs that file after requirements.txt."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    skipped_without = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                skipped_without.add(node.args[0].value.split(".")[0])
    skipped_without -= modules
    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements-extras.txt").read_text().splitlines()]
    extras = [l.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_") for l in lines if l]
    steps = (ROOT / ".ci" / "run").read_text()
    own_env = {"anndata"}  # caps pandas below 3: .ci/run gives its test an environment of its own
    for module in sorted(skipped_without - own_env):  # an import name starts its package's name (openslide-python)
        assert any(p.startswith(module.lower()) for p in extras), f"{module}: not in requirements-extras.txt"
    for module in own_env:
        assert f" {module} " in steps, f"{module}: .ci/run installs it nowhere"
    assert "-r requirements-extras.txt" in steps
    assert steps.index("-r requirements.txt") < steps.index("-r requirements-extras.txt") < steps.index("pytest -q tests")
