"""The docs stay true to the tree: the generated recipe reference is current, links lead somewhere,
the README stays an overview, and the pages it promises exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 160
# [text](target) and ![alt](target); the target stops at whitespace or ")"; alt text may span lines
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(page: Path) -> set[str]:
    """GitHub-style heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_recipe_reference_is_generated_from_the_current_config_metadata():
    gen = load_generator()
    text = gen.render()
    assert (DOCS / "recipes.md").read_text() == text, (
        "docs/recipes.md is out of date: run .venv/bin/python docs/gen_reference.py"
    )
    # the page really comes from the metadata: every field of every bundled kind, with its help
    from frankenlab.pipeline.stages import stage_kind

    for kind in ("depth", "width", "lora", "gptq", "eora"):
        assert f'### `kind = "{kind}"`' in text
        for field in stage_kind(kind).fields():
            assert f"| `{field.name}` |" in text
            assert gen.cell(field.help) in text


def test_the_generator_notices_a_changed_help_text(monkeypatch):
    """A help text edited in the code changes the page (what the staleness check above relies on)."""
    from dataclasses import replace

    from frankenlab.pipeline import stages
    from frankenlab.pipeline.stages.depth import Config as DepthConfig

    gen = load_generator()
    before = gen.render()
    real = stages.config_fields

    def edited(cls):
        fields = real(cls)
        return [replace(f, help=f.help + " (edited)") for f in fields] if cls is DepthConfig else fields

    monkeypatch.setattr(stages, "config_fields", edited)
    after = gen.render()
    assert after != before
    assert after.count("(edited)") == len(real(DepthConfig))


def test_check_mode_exits_nonzero_on_a_stale_page(tmp_path, monkeypatch, capsys):
    gen = load_generator()
    stale = tmp_path / "recipes.md"
    stale.write_text("# stale\n")
    monkeypatch.setattr(gen, "PAGE", stale)
    assert gen.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert gen.main([]) == 0  # writes it
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: outside the repository
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_readme_stays_an_overview():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    # the screenshot, the two commands, the fast subset and the docs are all there
    assert "](docs/img/lab.svg)" in text
    for command in ("bash .ci/lab", "bash .ci/test", 'bash .ci/test -m "not slow"'):
        assert command in text
    # no pointer to the design notes outside the repository, no tracker references
    assert "DESIGN.md" not in text
    assert not re.search(r"\bissue \d+", text, re.IGNORECASE)


def test_the_readme_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    linked = {Path(t.partition("#")[0]).resolve() for t in LINK.findall(text)}
    pages = {p.resolve() for p in DOCS.rglob("*.md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(str(p) for p in pages - linked)}"


def test_the_screenshot_is_a_real_lab_screen_and_small():
    svg = DOCS / "img" / "lab.svg"
    text = svg.read_text()
    assert text.startswith("<svg") and svg.stat().st_size < 300 * 1024
    # drawn by the lab on the bundled model: its tabs and a what-if answer on the full slice
    for needle in ("Layers", "SmolLM2", "what-if", "full", "slice"):
        assert needle in text, needle


def test_the_license_is_the_apache_license_pyproject_declares():
    from frankenlab.evals import toml

    declared = toml.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_frankenlab_environment_variable_in_the_code_is_documented():
    used = set()
    for folder in ("evals", "pipeline", "sessions", "tui", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py"):
                used |= set(re.findall(r"\bFRANKENLAB_[A-Z_]+\b", path.read_text(errors="replace")))
    used.discard("FRANKENLAB_SOURCE")  # a file name the GGUF converter writes, not a variable
    documented = set(re.findall(r"`(FRANKENLAB_[A-Z_]+)`", (DOCS / "installation.md").read_text()))
    assert used, "no FRANKENLAB_ variables found: the search is broken"
    assert not used - documented, f"undocumented: {sorted(used - documented)}"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_tracker_references(page):
    """The docs speak for themselves: no "issue 13" a reader cannot open."""
    hits = re.findall(r"\b(?:issue|Issue) \d+", page.read_text())
    assert not hits, f"{page.relative_to(ROOT)}: {hits}"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_have_as_many_cells_in_every_row_as_in_their_header(page):
    """A row with a stray or missing `|` renders as a broken table."""

    def cells(line: str) -> int:
        return len(re.findall(r"(?<!\\)\|", line.strip().strip("|"))) + 1

    bad, header, in_code = [], None, False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        is_row = not in_code and line.lstrip().startswith("|")
        if not is_row:
            header = None
        elif header is None:
            header = cells(line)
        elif cells(line) != header:
            bad.append(f"line {n}: {cells(line)} cells, header has {header}")
    assert not bad, f"{page.relative_to(ROOT)}: {'; '.join(bad)}"
