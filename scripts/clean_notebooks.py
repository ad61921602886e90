"""Refresh and clean the tutorial notebooks before committing them.

    python scripts/clean_notebooks.py --execute notebooks/*.ipynb   # run, keep checked outputs, clean
    python scripts/clean_notebooks.py notebooks/*.ipynb             # clean only (no kernel)
    python scripts/clean_notebooks.py --check notebooks/*.ipynb     # exit 1 if a notebook is not clean

The rule (the same one tests/test_notebooks_clean.py enforces):

* a code cell tagged ``nbval-check-output`` (cell metadata, View > Cell tags in JupyterLab; the
  learner never sees it in the code) keeps its outputs and its execution_count:
  nbval (``pytest --nbval-lax``) compares them with a fresh run, and skips a cell silently when its
  execution_count is missing;
* every other code cell is stored without outputs and without execution_count;
* widget state, kernel-run timing and other per-run metadata are removed.

With ``--execute`` each notebook is run top to bottom with nbclient, in its own folder (so
``images/...`` paths work), with ``PHI_HELPERS_MODEL=tiny`` unless that variable is already set: the
stored outputs then come from the same tiny random checkpoint that CI uses. Only the outputs of the
checked cells are kept, and those must not depend on the model.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

CHECK_TAG = "nbval-check-output"
NOTEBOOK_METADATA_TO_DROP = ("widgets",)
CELL_METADATA_TO_DROP = ("execution", "collapsed", "scrolled", "ExecuteTime", "widgets")
REPO = Path(__file__).resolve().parent.parent


def is_checked(cell) -> bool:
    """True for a code cell tagged ``nbval-check-output``."""
    return cell.cell_type == "code" and CHECK_TAG in cell.metadata.get("tags", [])


def execute(notebook, path: Path, timeout: int = 600):
    """Run ``notebook`` in its own folder with the tiny model (unless PHI_HELPERS_MODEL is set)."""
    from nbclient import NotebookClient

    os.environ.setdefault("PHI_HELPERS_MODEL", "tiny")
    os.environ.setdefault("PHI_HELPERS_CACHE", str(REPO / ".cache" / "phi_helpers"))  # as conftest.py
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return notebook


def clean(notebook):
    """Keep outputs and execution_count on checked cells only; drop per-run metadata. Returns the notebook."""
    for key in NOTEBOOK_METADATA_TO_DROP:
        notebook.metadata.pop(key, None)
    notebook.metadata.get("language_info", {}).pop("version", None)  # the Python version of whoever ran it
    for cell in notebook.cells:
        for key in CELL_METADATA_TO_DROP:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        if is_checked(cell):
            cell.outputs = coalesce_streams(cell.outputs)
            for output in cell.outputs:
                if output.get("output_type") == "execute_result":
                    output["execution_count"] = cell.execution_count
                output.get("metadata", {}).pop("execution", None)
        else:
            cell.outputs = []
            cell.execution_count = None
    return notebook


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stdout (or stderr) pieces into one output, as Jupyter displays them."""
    merged = []
    for output in outputs:
        if (
            output.get("output_type") == "stream"
            and merged
            and merged[-1].get("output_type") == "stream"
            and merged[-1].get("name") == output.get("name")
        ):
            merged[-1]["text"] += output["text"]
        else:
            merged.append(output)
    return merged


def problems(notebook) -> list[str]:
    """What a committed notebook must not contain (checked cells without outputs or a count)."""
    found = []
    for index, cell in enumerate(notebook.cells):
        if is_checked(cell) and (not cell.outputs or cell.execution_count is None):
            found.append(f"cell {index} is tagged {CHECK_TAG} but has no stored output/execution_count")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--execute", action="store_true", help="run each notebook (tiny model) before cleaning")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is not clean")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell when executing (default 600)")
    args = parser.parse_args(argv)

    status = 0
    for path in args.notebooks:
        original = path.read_text(encoding="utf-8")
        notebook = nbformat.reads(original, as_version=4)
        started = time.perf_counter()
        if args.execute:
            execute(notebook, path, timeout=args.timeout)
        cleaned = nbformat.writes(clean(notebook)) + "\n"
        nbformat.validate(nbformat.reads(cleaned, as_version=4))
        issues = problems(notebook)
        took = f" ({time.perf_counter() - started:.0f} s)" if args.execute else ""
        if args.check:
            if cleaned != original or issues:
                print(f"{path}: not clean; run: python scripts/clean_notebooks.py --execute {path}")
                status = 1
            continue
        if cleaned != original:
            path.write_text(cleaned, encoding="utf-8")
            print(f"{path}: written{took}")
        else:
            print(f"{path}: unchanged{took}")
        for issue in issues:
            print(f"{path}: warning: {issue}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
