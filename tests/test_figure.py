"""docs/figure.py: the method figure draws, and every class and function it names exists.

Names are looked up in the modules' source (ast), not by importing them: importing model.py costs
torch's start-up, seconds, and this file should stay instant.
"""
import ast
import importlib.util
import re
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("figure", REPO / "docs" / "figure.py")
figure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figure)


def defined(module: str) -> dict[str, ast.AST]:
    """The top-level classes, functions and assignments of a module (model, genedml.trunk ...), by name."""
    tree = ast.parse((REPO / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
    return names


def self_attributes(cls: ast.ClassDef) -> set[str]:
    """Attributes a class sets as self.<name> = ... in any of its methods."""
    return {t.attr for node in ast.walk(cls) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def test_draws_the_figure(tmp_path):
    path = figure.draw(tmp_path / "method.png")
    assert path == tmp_path / "method.png" and not list(tmp_path.glob("*.png.*")) and len(list(tmp_path.iterdir())) == 1
    img = Image.open(path).convert("L")
    assert img.size == figure.SIZE and 1400 <= img.size[0] <= 1800 and 800 <= img.size[1] <= 1000
    ink = sum(img.histogram()[:250])  # pixels that are not (near) white
    assert ink > 0.1 * img.size[0] * img.size[1], f"only {ink} non-white pixels: is the figure blank?"
    # the committed picture is the script's: same size (pixels may differ with Pillow's font rendering)
    committed = REPO / "docs" / "method.png"
    assert committed.is_file(), "docs/method.png is missing: run python docs/figure.py"
    assert Image.open(committed).size == img.size


def test_layout_has_no_overlaps():
    _, problems = figure.layout(figure.fonts())
    assert problems == []


def test_every_box_names_code_that_exists():
    coded = [b for b in figure.BOXES if b.module is not None]
    assert {"LocalEncoder", "ResNet18Trunk", "NeighbourEncoder", "GlobalEncoder", "PEG", "Fusion", "GeneEncoder",
            "GeneDML.head", "GeneDML.cluster_head", "multi_scale_instance_loss", "instance_group_loss",
            "gene_dml_loss"} <= {b.name for b in coded}
    for b in coded:
        assert b.name in b.text, f"box {b.name}: its label must show its name"
        cls, _, attr = b.name.partition(".")
        names = defined(b.module)
        assert cls in names, f"{b.name}: no {cls} in {b.module}.py"
        if attr:
            assert attr in self_attributes(names[cls]), f"{b.name}: {cls} in {b.module}.py never sets self.{attr}"


def test_every_function_called_in_the_figure_is_in_losses():
    functions = {n for n, node in defined("losses").items() if isinstance(node, ast.FunctionDef)}
    texts = [b.text for b in figure.BOXES] + [a.label for a in figure.ARROWS]
    called = {m for t in texts for m in re.findall(r"(?<![\w.])([a-z_][a-z0-9_]*)\(", t)}  # F.mse_loss( is torch's
    assert {"soft_info_nce"} <= called and called <= functions, f"not in losses.py: {called - functions}"
    loss_boxes = {b.name for b in figure.BOXES if b.module == "losses"}
    assert loss_boxes <= functions, f"not in losses.py: {loss_boxes - functions}"
