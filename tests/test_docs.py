"""The documentation: the README as a front door, the docs site's strict build, the generated
configuration reference, and links that resolve.

The site (mkdocs.yml, docs/) is built with ``mkdocs build --strict``, so a broken link or anchor,
a missing page or a page left out of the nav fails here. docs/configuration.md must equal what
hybridps.config_reference renders from the code (``make docs-reference`` regenerates it).
"""
import dataclasses
import os
import re
import subprocess
import sys

from markdown.extensions.toc import slugify

from hybridps.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _table_rows(text):
    """{field: [cells]} of the configuration page's field table."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)` \|", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    return rows


def test_configuration_page_is_the_rendered_reference():
    from hybridps.config_reference import render
    page = _read("docs/configuration.md")
    assert page == render(), ("docs/configuration.md is out of date with hybridps/config.py and "
                              "hybridps/cli.py: run `make docs-reference`")


def test_configuration_reference_lists_every_field_with_its_flag_and_default():
    from hybridps.config_reference import render
    rows = _table_rows(render())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(rows) == fields
    # written out by hand from the flag definitions and defaults
    assert rows["batch_size"] == ["`batch_size`", "`--batch-size`", "`512`", "int", "samples per rank per step"]
    assert rows["hidden"][:4] == ["`hidden`", "`--hidden`", "`[256, 128]`", "list of int"]
    assert rows["sync"][3] == "bsp, ssp, asp"
    assert rows["features"][1:3] == ["(YAML only)", "`none`"]
    assert rows["progress"][1:3] == ["`--no-progress`", "`true`"]
    assert rows["shuffle"][2] == "`false`"


def test_mkdocs_strict_build(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                             "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "design.html").exists()


def _anchors(markdown_text):
    anchors = set()
    in_code = False
    for line in markdown_text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(slugify(line.lstrip("#").strip(), "-"))
    return anchors


def test_readme_links_resolve():
    readme = _read("README.md")
    links = [link for link in LINK.findall(readme) if not re.match(r"[a-z]+:", link)]
    assert links, "the README links to the docs"
    for link in links:
        path, _, anchor = link.partition("#")
        assert os.path.exists(os.path.join(ROOT, path)), f"README.md links to a missing {path}"
        if anchor:
            assert anchor in _anchors(_read(path)), f"README.md links to a missing anchor {link}"


def test_readme_is_a_front_door():
    readme = _read("README.md")
    assert readme.count("\n") <= 200
    # the first content after the title is the two commands
    assert readme.startswith("# hybridps\n\n```\nmake demo\nmake test\n```\n")
    assert re.search(r"^## Architecture$", readme, re.M)


def test_docs_cite_nothing_outside_the_repository_and_no_history():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stdout.split()
    outside = re.compile(r"\.\./shared|\b" + "DESIGN" + r"\.md")
    history = re.compile(r"\bstops? \d+\b|\bthis stop\b|\bnot met\b", re.I)
    for path in tracked:
        if not os.path.isfile(os.path.join(ROOT, path)) or path.endswith((".so", ".parquet", ".gz")):
            continue
        try:
            text = _read(path)
        except UnicodeDecodeError:
            continue
        assert not outside.search(text), f"{path} cites a document outside the repository"
        if path == "README.md" or (path.startswith("docs/") and path.endswith(".md")):
            assert not history.search(text), f"{path} speaks of development history"
