"""The README is the front door: short, with the set-up commands CI runs, a file map before the
results, and links that lead somewhere (README.md and docs/*.md); every command in it, in docs/ and in
the scripts' own docstrings runs a script that exists with flags that script takes (its --help)."""
import ast
import contextlib
import importlib
import io
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


def test_the_file_map_names_the_five_files_and_the_four_folders():
    assert {f for _, f in file_map()} == {"losses.py", "model.py", "data.py", "train.py", "evaluate.py",
                                           "genedml/", "experiments/", "docs/", "tests/"}


@pytest.mark.parametrize("package", ["genedml", "experiments"])
def test_each_folder_has_its_own_map_naming_every_module(package):
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text())) or ""
    listed = set(re.findall(r"^\s*(?:python -m \w+\.)?(\w+)", doc, flags=re.M))
    modules = {p.stem for p in (REPO / package).glob("*.py")} - {"__init__"}
    assert modules <= listed, f"{package}/__init__.py's map misses {sorted(modules - listed)}"


# ----------------------------------------------------------------------------- every command as written
COMMAND = re.compile(r"(?:^|\$ |`|&& )(?:time )?(python (?:-m [\w.]+|[\w/]+\.py)[^`\n#]*|torchrun [^`\n#]*)", flags=re.M)


def commands():
    """Every `python ...` and `torchrun ...` command in the README, docs/*.md and the five files' and
    both packages' docstrings (--help texts are built from them), as (where, command)."""
    sources = [README, *DOCS, *REPO.glob("*.py"), *(REPO / "genedml").glob("*.py"), *(REPO / "experiments").glob("*.py")]
    for path in sources:
        for command in COMMAND.findall(path.read_text()):
            yield str(path.relative_to(REPO)), command.strip()


def target(command: str) -> tuple[str, list[str]]:
    """The script a command runs (train.py, experiments.benchmark ...) and its words after it."""
    words = command.split()
    if words[0] == "torchrun":
        i = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        return (words[i], words[i + 1:]) if i is not None else (None, [])  # None: continued on the next line
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


SUBCOMMANDS = {"data.py": ("download", "info", "folds", "demo"), "genedml.visium": ("info", "hest-cohort"),
               "experiments.ablation": ("ablation", "her2st", "compare", "balance")}


def help_text(script: str, sub: str | None) -> str:
    """What `python <script> [sub] --help` prints, run in this process (each script's main takes argv)."""
    name = script[:-3].replace("/", ".") if script.endswith(".py") else script
    main = importlib.import_module(name).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*([sub] if sub else []), "--help"])
    assert e.value.code == 0, f"{script} {sub or ''} --help exited {e.value.code}"
    return out.getvalue()


def test_every_command_in_the_docs_runs_a_script_that_exists_and_takes_its_flags():
    """Each command names a file or module that exists (and a subcommand it has); each --flag it passes is
    in that script's --help. Flags after ` -- ` go to train.py (the ablations pass them on)."""
    wanted, problems = {}, []
    for where, command in commands():
        if command in ("python -m pytest -q tests",) or "pytest" in command or "pip " in command or "<" in command.split()[1]:
            continue
        script, rest = target(command)
        if script is None:
            continue
        path = REPO / script if script.endswith(".py") else REPO / (script.replace(".", "/") + ".py")
        if not path.is_file() or script in ("docs/figure.py",):
            if not path.is_file():
                problems.append(f"{where}: {command!r}: no {script}")
            continue
        sub = next((w for w in rest if not w.startswith("-")), None) if script in SUBCOMMANDS else None
        if script in SUBCOMMANDS and rest and sub not in SUBCOMMANDS[script]:
            problems.append(f"{where}: {command!r}: {script} has no subcommand {sub!r}")
            continue
        own, _, passed_on = " ".join(rest).partition(" -- ")
        for flags, key in ((own, (script, sub)), (passed_on, ("train.py", None))):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", flags):
                wanted.setdefault(key, {}).setdefault(flag, []).append(f"{where}: {command!r}")
    helps = {key: help_text(*key) for key in sorted(wanted, key=str)}
    for key, flags in wanted.items():
        for flag, seen in flags.items():
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[key]):
                problems.append(f"{seen[0]}: {' '.join(k for k in key if k)} has no {flag}")
    assert not problems, "\n".join(problems)
