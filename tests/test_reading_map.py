"""README's reading map (paper -> file.py:function), the Differences numbers and the docs' links cannot rot.

Every `file.py:function` the map names must exist, and for an equation row the function's source must
carry that equation's `Eq. (N)` tag; every equation 1-13 must be mapped; every Differences item the code
cites ("docs/differences.md #N", or the older "README Differences N") must be an item of
docs/differences.md's numbered list. README stays a front door (at most 350 lines), every relative link
of README.md and docs/*.md reaches a file, and the pages speak of the project, not of how it was built.
"""
import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PAGES = [os.path.join(REPO, "README.md")] + DOCS


def section(title: str, text: str = README) -> str:
    """The `## title...` section of README (or of another page's text), up to the next `## `."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def differences_items() -> set[int]:
    """The numbers `N. **...**` of docs/differences.md's list, which the code cites."""
    text = open(os.path.join(REPO, "docs", "differences.md"), encoding="utf-8").read()
    return {int(n) for n in re.findall(r"(?m)^(\d+)\. \*\*", text)}


def cited_differences(text: str) -> set[int]:
    """Differences items a source cites: `docs/differences.md #N` (also `#N-M`, `#N, #M`) or `README Differences N`."""
    cited = {int(n) for n in re.findall(r"README Differences (\d+)", text)}
    for group in re.findall(r"docs/differences\.md((?:[ ,]*(?:and )?#\d+(?:[-–]\d+)?)+)", text):
        for a, b in re.findall(r"#(\d+)(?:[-–](\d+))?", group):
            cited.update(range(int(a), int(b or a) + 1))
    return cited


def map_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    """(paper cell, [(file, dotted name), ...]) of every row of the reading map's table."""
    rows = []
    for line in section("Reading map").split("\n### ")[0].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 3 or cells[0] in ("paper", "---"):
            continue
        rows.append((cells[0], re.findall(r"`([\w/]+\.py):([\w.]+)`", " ".join(cells[1:]))))
    return rows


def source_of(file: str, dotted: str) -> str:
    """The source of a top-level function/class or a Class.method in `file`; KeyError if there is none."""
    text = open(os.path.join(REPO, file), encoding="utf-8").read()
    body = ast.parse(text).body
    node = None
    for name in dotted.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            raise KeyError(f"{file} has no {dotted}")
        body = node.body
    return "\n".join(text.splitlines()[node.lineno - 1:node.end_lineno])   # whole lines: trailing comments too


def equation_tags(source: str) -> set[int]:
    """The equations a source tags: `Eq. (N)`, and every N of a range `Eq. (a)-(b)`."""
    tags = set()
    for a, b in re.findall(r"Eq\. \((\d+)\)(?:-\((\d+)\))?", source):
        tags.update(range(int(a), int(b or a) + 1))
    return tags


def problems(rows) -> list[str]:
    found = []
    for paper, refs in rows:
        equation = re.fullmatch(r"Eq\. \((\d+)\)", paper)
        for file, name in refs:
            try:
                source = source_of(file, name)
            except (KeyError, OSError) as e:
                found.append(f"{paper}: {e}")
                continue
            if equation and int(equation.group(1)) not in equation_tags(source):
                found.append(f"{paper}: {file}:{name} carries no Eq. ({equation.group(1)}) tag")
    return found


@pytest.mark.slow
def test_every_mapped_function_exists_and_carries_its_equation():
    rows = map_rows()
    assert len(rows) >= 20 and all(refs for paper, refs in rows if paper.startswith("Eq."))
    assert problems(rows) == []


def test_every_equation_of_the_paper_is_mapped():
    mapped = {int(m) for paper, _ in map_rows() for m in re.findall(r"Eq\. \((\d+)\)", paper)}
    assert mapped == set(range(1, 14))
    for figure in ("Tab. 1", "Tab. 2", "Tab. 3", "Tab. 4", "Tab. 5", "Fig. 6", "§3.3", "§3.4", "§4.4"):
        assert any(paper.startswith(figure) for paper, _ in map_rows()), figure


def test_the_checker_catches_a_wrong_map():
    """A moved function, a missing method and a missing tag are each reported."""
    wrong = [("Eq. (9)", [("train_dpc.py", "hard_negative_loss_v2")]),
             ("Eq. (8)", [("train_dpc.py", "NegativeSampler.selection")]),
             ("Eq. (13)", [("train_dpc.py", "weighting")]),
             ("Eq. (12)", [("no_such_file.py", "weighting")])]
    assert len(problems(wrong)) == 4
    assert equation_tags("# Eq. (10)-(11): softmax") == {10, 11}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "tools", "*.py"))
                                        + glob.glob(os.path.join(REPO, "tests", "*.py"))))
def test_cited_differences_exist_and_no_file_users_lack_is_cited(path):
    items = differences_items()
    assert items == set(range(1, len(items) + 1)) and len(items) >= 10
    text = open(path, encoding="utf-8").read()
    cited = cited_differences(text)
    assert cited <= items, f"{os.path.basename(path)} cites Differences {sorted(cited - items)}, which docs/differences.md lacks"
    if os.path.basename(path) != "test_reading_map.py":
        assert not re.search(r"DECISIONS|spec/|backbones\.md|dpc_official_code", text)


def test_both_citation_forms_are_read():
    assert cited_differences("docs/differences.md #6; docs/differences.md #1, #16 and docs/differences.md #6-7") == {1, 6, 7, 16}
    assert cited_differences("see docs/differences.md #11.") == {11}


def relative_links(text: str) -> list[str]:
    """The targets of a page's markdown links that are neither web addresses nor same-page anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_reaches_a_file(page):
    text = open(page, encoding="utf-8").read()
    links = relative_links(text)
    missing = [t for t in links if not os.path.exists(os.path.join(os.path.dirname(page), t.split("#")[0]))]
    assert missing == []
    if page != PAGES[0]:
        assert text.startswith("# ") and "](../README.md)" in text.splitlines()[2], "a docs page opens with its title and a link back"


def test_the_link_check_can_fail():
    assert relative_links("[a](docs/x.md) [b](https://x.org) [c](#here) [d](../README.md#set-up)") == \
        ["docs/x.md", "../README.md#set-up"]


def test_readme_is_a_front_door_and_every_topic_has_its_page():
    assert len(README.splitlines()) <= 350
    for topic in ("differences", "toy_world", "clusters", "transfer", "dept", "ablation", "figures",
                  "loading_safely", "speed", "faults"):
        assert f"](docs/{topic}.md)" in README, topic


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_pages_speak_of_the_project_not_of_how_it_was_built(page):
    assert not re.search(r"session", open(page, encoding="utf-8").read(), re.IGNORECASE)


STAGES = {"train_backbone", "train_dpc", "evaluate"}
BELOW = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py"))
               if os.path.basename(p)[:-3] not in STAGES)


def project_imports(module: str) -> set[str]:
    """The project's modules that `module` imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(REPO, module + ".py"), encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return imported & (set(BELOW) | STAGES)


@pytest.mark.parametrize("module", BELOW)
def test_modules_below_the_stages_never_import_a_stage(module):
    """README "Layout": the stages import the modules below them, never the other way round."""
    assert not project_imports(module) & STAGES, module


def test_the_modules_import_each_other_without_a_cycle():
    """README "Layout": every module can be read knowing only the ones below it (data.py and toy_world.py too)."""
    graph = {m: project_imports(m) for m in BELOW + sorted(STAGES)}
    done, path = set(), []

    def visit(m):
        assert m not in path, " -> ".join(path[path.index(m):] + [m])
        if m not in done:
            path.append(m)
            for n in sorted(graph[m]):
                visit(n)
            path.pop()
            done.add(m)
    for m in graph:
        visit(m)
    graph["data"].add("toy_world")
    graph["toy_world"].add("data")
    with pytest.raises(AssertionError, match="data -> toy_world -> data"):   # the check can fail
        done.clear()
        visit("data")


CARD = {"clip_model", "prompts", "data"}   # the design card's model and data files: banner-sectioned, longer


def test_every_module_reads_in_one_sitting():
    """README "Layout": a stage file is at most 450 lines, a support module below the stages at most 550."""
    lines = {m: len(open(os.path.join(REPO, m + ".py"), encoding="utf-8").read().splitlines())
             for m in BELOW + sorted(STAGES) if m not in CARD}
    assert {m: n for m, n in lines.items() if n > (450 if m in STAGES else 550)} == {}
