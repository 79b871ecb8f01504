"""The repository's shape: imports between the project's modules run one way (no circle)."""
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
    assert not graph["model"] and not graph["losses"]
    assert not graph["slide"] and not graph["h5ad"]  # reading slides and writing AnnData need nothing of ours
    assert not graph["prediction"] & {"evaluate", "train", "demo", "features", "model"}
