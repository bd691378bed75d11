"""The user docs stay a front page plus docs/: the README is short, every relative link and anchor resolves, and no
user doc narrates the project's history by issue number (history goes to CHANGELOG.md, if anywhere)."""

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
USER_DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 250

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)


def _strip_code(text: str) -> str:
    """The text outside fenced code blocks (links and headings there are not links and headings)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)  # inline code keeps its text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _strip_code(path.read_text(encoding="utf-8"))
    found, seen = set(HTML_ANCHOR.findall(text)), {}
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(_strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{target}: no heading or anchor #{fragment} in {dest.name}")
    return problems


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    for command in ("make quickstart", "make test"):
        assert command in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_user_docs_do_not_cite_issue_numbers(path):
    hits = [
        f"{i}: {line.strip()}"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert hits == [], "say what the tool does, not which issue added it"


def test_every_doc_is_reachable_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_strip_code(README.read_text()))}
    assert [p.name for p in USER_DOCS[1:] if p.resolve() not in linked] == []


def test_the_slug_rule():
    assert (
        _slug("Node-local copies: `deit3-fast stage` and `data.stage_to`")
        == "node-local-copies-deit3-fast-stage-and-datastage_to"
    )
    assert _slug("Ablations: `deit3-fast ablate`") == "ablations-deit3-fast-ablate"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "a.md").write_text(
        "# A title\n\n[ok](#a-title) [ok](b.md#b) [bad](b.md#nope) [bad](c.md)\n```\n[not a link](missing.md)\n```\n"
    )
    (tmp_path / "b.md").write_text("## B\n")
    assert [p.split(":")[0] for p in broken_links(tmp_path / "a.md")] == ["b.md#nope", "c.md"]


SHORT_SIDE = re.compile(r"--short-side[ =](\d+)")


def test_convert_help_says_what_the_converter_writes_and_the_docs_recommend(good_tree, tmp_path):
    """deit3-convert --help, the docs and the recipes agree: the report is named as the converter writes it
    (OUT.beton.json), and validation sets are stored at the short side the recipes' data.val files assume."""
    from dataset_tools.convert import EVAL_SHORT_SIDE, build_parser, convert
    from deit3_fast.parity.variants import DEFAULT_VAL_STORAGE

    convert(str(good_tree), str(tmp_path / "OUT.beton"), workers=1, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["OUT.beton.json"]
    parser = build_parser()
    text = parser.format_help()
    assert "OUT.beton.json" in text and "OUT.json" not in text

    short_side = next(a for a in parser._actions if "--short-side" in a.option_strings)
    assert f"{EVAL_SHORT_SIDE} for validation" in short_side.help
    val_examples = [line for line in text.splitlines() if line.strip().startswith("deit3-convert") and "/val" in line]
    assert val_examples and all(SHORT_SIDE.findall(line) == [str(EVAL_SHORT_SIDE)] for line in val_examples)

    # Every place that says which short side a validation .beton gets says the same number.
    said = {}
    for path in [*USER_DOCS, *sorted((REPO / "configs").rglob("*.yaml"))]:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\b(e?val|validation)", line, re.IGNORECASE):
                for n in SHORT_SIDE.findall(line):
                    said[f"{path.relative_to(REPO)}:{i}"] = int(n)
    assert any(where.startswith("README.md") for where in said)
    assert {where: n for where, n in said.items() if n != EVAL_SHORT_SIDE} == {}
    assert DEFAULT_VAL_STORAGE == f"short{EVAL_SHORT_SIDE}"
