"""The book's notebooks are in their committed form and agree with _config.yml and _toc.yml."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.rglob("*.ipynb"))
MARK = "# NBVAL_CHECK_OUTPUT"


def _config_repo_url() -> str:
    text = (ROOT / "_config.yml").read_text()
    m = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", text, re.M)
    assert m, "_config.yml must set repository.url"
    return m.group(1).rstrip("/")


def _toc_files() -> list[str]:
    return re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())


def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_names_the_configured_repository(path):
    url = _config_repo_url()
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    first = "".join(code[0]["source"])
    assert "google.colab" in first and "pip install" in first, f"{path.name}: first code cell must install on Colab"
    m = re.search(r"git\+(\S+?)[\"'\s]", first)
    assert m, f"{path.name}: the install cell must install from git+<repository url>"
    assert m.group(1).rstrip("/") == url, f"{path.name} installs from {m.group(1)}, _config.yml says {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        if MARK in src:
            assert cell.get("outputs"), f"{path.name} cell {i}: {MARK} cells must keep the output nbval compares"
        else:
            assert not cell.get("outputs"), f"{path.name} cell {i}: commit notebooks without outputs (scripts/nbtool.py strip)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_does_not_depend_on_the_repository_layout(path):
    for cell in _cells(path):
        src = "".join(cell["source"])
        if cell["cell_type"] == "code":
            assert "sys.path" not in src, f"{path.name}: no sys.path changes; use the installed package"
            assert "../" not in src, f"{path.name}: no relative paths out of the notebook's folder"


def test_every_toc_entry_exists_and_every_notebook_is_listed():
    listed = set()
    for entry in _toc_files():
        matches = [p for p in (ROOT / (entry + ext) for ext in ("", ".md", ".ipynb")) if p.is_file()]
        assert matches, f"_toc.yml lists {entry}, which does not exist"
        listed.add(matches[0].resolve())
    for nb in NOTEBOOKS:
        assert nb.resolve() in listed, f"{nb.relative_to(ROOT)} is not in _toc.yml"


def _book_labels() -> set:
    labels = set()
    for path in list(BOOK.rglob("*.ipynb")) + list(BOOK.rglob("*.md")):
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
        labels |= set(re.findall(r"\$\$\s*\((eq-[A-Za-z0-9_-]+)\)", text))
        labels |= set(re.findall(r"^\((eq-[A-Za-z0-9_-]+)\)=", text, re.M))
        labels |= set(re.findall(r":label:\s*(eq-[A-Za-z0-9_-]+)", text))
    return labels


def test_every_equation_label_the_library_cites_is_defined_in_the_book():
    cited = {}
    for path in sorted((ROOT / "ddpm_lib").glob("*.py")):
        for label in re.findall(r"\b(eq-[a-z0-9]+(?:-[a-z0-9]+)*)", path.read_text()):
            cited.setdefault(label, path.name)
    defined = _book_labels()
    missing = {label: where for label, where in cited.items() if label not in defined}
    assert not missing, f"labels cited in ddpm_lib but not defined in the book: {missing}"
