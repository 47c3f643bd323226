"""The docs stay true: every relative link and image in README.md and docs/ resolves (anchors included), every
module of gram_ray is named in the README's code layout or on the design page, and the README's "read these
first" list points at files that exist, and stays short."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_every_relative_link_and_image_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_outside_code(page.read_text())):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_every_module_is_named_in_the_layout_or_on_the_design_page():
    named = (REPO / "README.md").read_text() + (REPO / "docs" / "design.md").read_text()
    modules = [p.relative_to(REPO).as_posix() for p in (REPO / "gram_ray").rglob("*.py") if p.name != "__init__.py"]
    assert [m for m in modules if m not in named] == []


def test_the_read_first_list_names_a_few_files_that_exist():
    readme = (REPO / "README.md").read_text()
    section = readme.split("Read these first:", 1)[1].split("\n## ", 1)[0]
    files = [target for target in LINK.findall(section)]
    assert 4 <= len(files) <= 8 and all((REPO / f).is_file() for f in files)


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    for page in PAGES:  # the design is told here, not in a file outside the repository
        assert "DESIGN.md" not in page.read_text(), page


def test_every_config_key_is_on_the_reference_page_with_a_description():
    """docs/config-reference.md is what `gram-ray config-reference` prints, run here as the page says: a key added
    to the config without a description, or without the page regenerated, fails."""
    import subprocess
    import sys

    from gram_ray.cli.config_reference import config_keys

    assert [k.name for k in config_keys() if not (k.description or "").strip()] == []
    printed = subprocess.run(
        [sys.executable, "-m", "gram_ray", "config-reference"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    page = (REPO / "docs" / "config-reference.md").read_text()
    assert printed == page, "regenerate it: gram-ray config-reference > docs/config-reference.md"
    assert "gram-ray config-reference > docs/config-reference.md" in (REPO / "docs" / "configuration.md").read_text()
    for key in config_keys():
        assert f"| `{key.name}` |" in page
