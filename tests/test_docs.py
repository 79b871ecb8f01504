"""The README is the front door: short, with the set-up commands CI runs, a file map before the
results, and links that lead somewhere (README.md and docs/*.md). Text only: no torch, no data."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
FIGURE = "docs/method.png"  # drawn by docs/figure.py and committed beside it
DEMO_COMMAND = "pip install -r requirements.txt && python train.py --data demo"
TEST_COMMAND = "python -m pytest -q tests"

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")


def prose(text):
    """The text outside fenced code blocks and inline code spans, where links and headings live."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def code_lines(text):
    """Every line inside a fenced code block."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines()]


def anchors(path):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen, out = {}, set()
    raw = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.S | re.M)  # keep inline code
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", raw, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path):
    """(target, where it points) for each relative link of a markdown file; http(s) and mailto left out."""
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):
            continue
        file, _, anchor = target.partition("#")
        yield target, ((path.parent / file).resolve() if file else path), anchor


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 260, f"README.md has {n} lines; keep it the front door (<= 260) and move detail to docs/"


def test_readme_gives_the_set_up_commands_ci_runs():
    lines = [re.split(r"\s+#", line)[0].strip() for line in code_lines(README.read_text())]
    assert DEMO_COMMAND in lines, f"README.md lost the demo command in a code block: {DEMO_COMMAND!r}"
    assert TEST_COMMAND in lines, f"README.md lost the test command in a code block: {TEST_COMMAND!r}"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if "-m pytest" in line]
    assert ci and ci[-1] == TEST_COMMAND, f".ci/run's last pytest line {ci[-1:]} is not the README's {TEST_COMMAND!r}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(path):
    broken = []
    for target, where, anchor in links(path):
        if where == (REPO / FIGURE).resolve():
            continue  # checked on its own below
        if not where.exists():
            broken.append(f"{target}: no file {where.relative_to(REPO)}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(REPO)}")
    assert not broken, f"{path.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_the_method_figure_is_shown_and_exists():
    assert f"![Gene-DML]({FIGURE})" in README.read_text(), f"README.md should show {FIGURE}"
    if not (REPO / FIGURE).exists():
        pytest.skip(f"{FIGURE} is not in this checkout yet (drawn by docs/figure.py on its own branch)")


def test_every_document_is_linked_from_the_readme():
    linked = {where for _, where, _ in links(README)}
    orphans = [str(p.relative_to(REPO)) for p in DOCS if p.resolve() not in linked]
    assert DOCS and not orphans, f"docs not linked from README.md: {orphans}"


def file_map():
    """The README's file map: the rows of the table whose first row names `losses.py`, as
    (line number, file); the first column of each row is a file in backticks."""
    lines = README.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"\|\s*`losses\.py`\s*\|", line)), None)
    assert start is not None, "README.md has no file map (a table row starting with | `losses.py` |)"
    rows = []
    for i in range(start, len(lines)):
        m = re.match(r"\|\s*`([^`]+)`\s*\|", lines[i])
        if not m:
            break
        rows.append((i, m.group(1)))
    return rows


def test_the_file_map_starts_with_the_losses_and_comes_before_the_results():
    rows = file_map()
    assert [f for _, f in rows[:2]] == ["losses.py", "model.py"], "read losses.py first, then model.py"
    lines = README.read_text().splitlines()
    first_result = next(i for i, line in enumerate(lines) if line.startswith("|") and "PCC" in line)
    assert rows[0][0] < first_result, \
        f"the file map (line {rows[0][0] + 1}) should come before the first results table (line {first_result + 1})"


def test_the_file_map_names_every_module():
    mapped = {f for _, f in file_map()}
    modules = {p.name for p in REPO.glob("*.py")} | {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.py")}
    missing = sorted(modules - mapped)
    assert not missing, f"modules missing from the README's file map: {missing}"
