"""Keep the book's notebooks in their committed form.

    python scripts/nbtool.py strip  book/*.ipynb    # drop outputs except `# NBVAL_CHECK_OUTPUT` cells
    python scripts/nbtool.py refresh book/x.ipynb   # execute in quick mode, then strip
    python scripts/nbtool.py check  book/*.ipynb    # exit 1 if a notebook is not in committed form

Cells whose source contains ``# NBVAL_CHECK_OUTPUT`` keep their outputs: nbval compares them.
They keep execution count 1 (nbval treats a reference cell without a count as unrun); every other
cell is committed without outputs and without an execution count.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat

MARK = "# NBVAL_CHECK_OUTPUT"


def _clean(nb) -> bool:
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        keep = MARK in cell.source
        if not keep and cell.get("outputs"):
            cell.outputs = []
            changed = True
        if keep:
            # nbval treats a reference cell without an execution count as unrun and fails on it
            if cell.get("outputs") and cell.get("execution_count") != 1:
                cell.execution_count = 1
                changed = True
            for out in cell.get("outputs", []):
                if "execution_count" in out and out["execution_count"] != 1:
                    out["execution_count"] = 1
                    changed = True
        elif cell.get("execution_count") is not None:
            cell.execution_count = None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets",):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def _problems(nb) -> list[str]:
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if MARK in cell.source:
            if not cell.get("outputs"):
                out.append(f"cell {i} is marked {MARK} but has no stored output")
        elif cell.get("outputs"):
            out.append(f"cell {i} has outputs (commit notebooks without outputs)")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in {"strip", "refresh", "check"}:
        print(__doc__)
        return 2
    cmd, paths = argv[0], [Path(p) for p in argv[1:]]
    status = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if cmd == "refresh":
            from nbclient import NotebookClient

            os.environ.setdefault("DDPM_BOOK_QUICK", "1")
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        if cmd in {"strip", "refresh"}:
            _clean(nb)
            nbformat.write(nb, path)
            print(f"wrote {path}")
        else:
            for p in _problems(nb):
                print(f"{path}: {p}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
