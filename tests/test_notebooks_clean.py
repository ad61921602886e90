"""The committed tutorial notebooks are clean: stored outputs only where nbval checks them, nothing
machine-specific, no downloads in cells that run by default, and the structure every notebook promises.

Refresh the notebooks with ``python scripts/clean_notebooks.py --execute notebooks/*.ipynb``.
"""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SOLUTIONS = REPO / "notebooks" / "solutions.ipynb"
LESSONS = [path for path in NOTEBOOKS if path != SOLUTIONS]
CHECK_TAG = "nbval-check-output"
MACHINE_PATHS = re.compile(
    r"/home/|/root/|/tmp/|/work/|/Users/|/private/var/|file://|site-packages|\.cache/"
    r"|\b[A-Za-z]:\\{1,2}(?:Users|Windows|Program|Temp)"  # C:\Users\..., C:\\Users (escaped)
)
URL = re.compile(r"https?://")


def _load_cleaner():
    spec = importlib.util.spec_from_file_location("clean_notebooks", REPO / "scripts" / "clean_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checked(cell) -> bool:
    return cell.cell_type == "code" and CHECK_TAG in cell.metadata.get("tags", [])


def _output_text(output) -> str:
    """All text an output carries (stream text, tracebacks, every mimetype of a result), as one string."""
    parts = [output.get("text", ""), output.get("ename", ""), output.get("evalue", "")]
    parts += output.get("traceback", [])
    for value in output.get("data", {}).values():
        parts.append(value if isinstance(value, str) else str(value))
    return "\n".join(str(part) for part in parts)


def test_the_tutorial_notebooks_exist():
    names = [path.name for path in LESSONS]
    assert names == [
        "00_setup.ipynb", "01_image_analysis.ipynb", "02_ocr_and_documents.ipynb", "02b_structured_extraction.ipynb",
        "03_multi_image.ipynb", "04_multi_turn_chat.ipynb", "05_without_flash_attention.ipynb", "06_scaling_up.ipynb",
    ]
    assert SOLUTIONS.is_file()


def _read(path):
    return nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)


@pytest.fixture(params=NOTEBOOKS, ids=lambda path: path.name)
def notebook(request):
    return _read(request.param)


@pytest.fixture(params=LESSONS, ids=lambda path: path.name)
def lesson(request):
    return _read(request.param)


def test_valid_nbformat(notebook):
    nbformat.validate(notebook)
    assert notebook.nbformat == 4


def test_outputs_only_on_checked_cells(notebook):
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if _checked(cell):
            assert cell.outputs, f"cell {index} is checked by nbval but has no stored output"
            assert cell.execution_count is not None, (
                f"cell {index}: nbval silently skips a checked cell without execution_count"
            )
        else:
            assert cell.outputs == [], f"cell {index} is not checked but stores outputs"
            assert cell.execution_count is None, f"cell {index} is not checked but has an execution_count"


def test_checked_cells_have_no_errors_or_images(notebook):
    for index, cell in enumerate(notebook.cells):
        if _checked(cell):
            for output in cell.outputs:
                assert output.output_type != "error", f"cell {index} stored an error"
                assert output.get("name") != "stderr", f"cell {index} stored stderr output"
                assert "image/png" not in output.get("data", {}), f"cell {index}: nbval does not compare images"


def test_no_machine_paths(notebook):
    for index, cell in enumerate(notebook.cells):
        assert not MACHINE_PATHS.search(cell.source), f"cell {index} source contains a machine path"
        for output in cell.get("outputs", []):
            text = _output_text(output)
            assert not MACHINE_PATHS.search(text), f"cell {index} output contains a machine path: {text[:200]!r}"


def test_no_downloads_in_default_cells(notebook):
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        code_lines = [line for line in cell.source.splitlines() if not line.lstrip().startswith("#")]
        assert not any(URL.search(line) for line in code_lines), (
            f"cell {index} fetches from the web; use the committed images/... files"
        )


def test_images_used_are_committed(notebook):
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            for name in re.findall(r"images/[\w.-]+", cell.source):
                assert (REPO / "notebooks" / name).is_file(), f"cell {index} uses missing file {name}"


def test_structure(lesson):
    markdown = [cell.source for cell in lesson.cells if cell.cell_type == "markdown"]
    assert markdown and markdown[0].lstrip().startswith("# "), "the first cell must be a title"
    assert any(re.search(r"^#+\s*What you will learn", text, re.MULTILINE) for text in markdown)
    assert any(re.search(r"^#+\s*Exercise", text, re.MULTILINE) for text in markdown)
    exercise = next(text for text in markdown if re.search(r"^#+\s*Exercise", text, re.MULTILINE))
    assert "Hint" in exercise


def test_every_exercise_has_a_solution():
    """solutions.ipynb has one section per lesson, headed by the lesson's name, in the lessons' order."""
    solutions = _read(SOLUTIONS)
    markdown = [cell.source for cell in solutions.cells if cell.cell_type == "markdown"]
    assert markdown[0].startswith("# "), "the first cell must be a title"
    headings = [line[3:] for text in markdown for line in text.splitlines() if line.startswith("## ")]
    sections = [heading.split(":")[0] for heading in headings if heading != "Setup"]
    assert sections == [path.stem for path in LESSONS]


def test_solutions_print_their_verdict_instead_of_asserting():
    """With the tiny model every answer is random: a check that stopped the notebook would fail CI."""
    for index, cell in enumerate(_read(SOLUTIONS).cells):
        if cell.cell_type == "code":
            assert not re.search(r"^\s*assert\b", cell.source, re.MULTILINE), f"cell {index} asserts"


def test_loading_cells_write_out_the_quantize_choice(notebook):
    """A 16 GB laptop needs quantize="int8" in every notebook: the setup cell shows where it goes."""
    calls = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for call in re.findall(r"(?:load_model|predict_dataset)\((?:[^()]|\([^()]*\))*\)", cell.source):
            calls += 1
            assert "quantize=" in call, f"cell {index}: {call[:60]!r} leaves the weights' choice implicit"
            assert '"int8"' in cell.source, f"cell {index}: say where int8 is the choice (a comment)"
    if any("load_model(" in cell.source for cell in notebook.cells if cell.cell_type == "code"):
        assert calls


def test_every_notebook_ends_by_freeing_the_kernel(notebook):
    """JupyterLab keeps a closed notebook's kernel, and its model, running."""
    last = notebook.cells[-1]
    assert last.cell_type == "markdown" and "Kernel > Shut Down Kernel" in last.source


def test_no_widget_state_or_run_metadata(notebook):
    assert "widgets" not in notebook.metadata
    for cell in notebook.cells:
        assert "execution" not in cell.metadata
        assert "widgets" not in cell.metadata
        for output in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {})


def test_cleaner_leaves_committed_notebooks_unchanged():
    """`clean_notebooks.py` (without --execute) is a no-op on the committed files: they are clean."""
    cleaner = _load_cleaner()
    for path in NOTEBOOKS:
        original = path.read_text(encoding="utf-8")
        cleaned = nbformat.writes(cleaner.clean(nbformat.reads(original, as_version=4))) + "\n"
        assert cleaned == original, f"{path.name} is not clean: run scripts/clean_notebooks.py --execute {path}"


def test_test_machinery_stays_out_of_the_lesson(notebook):
    """nbval is steered by cell tags, never by comments the learner would read in the code."""
    for index, cell in enumerate(notebook.cells):
        assert "NBVAL" not in cell.source, f"cell {index}: use the cell tag {CHECK_TAG!r} instead of a comment"


def test_cleaner_rules():
    cleaner = _load_cleaner()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    checked = nbformat.v4.new_code_cell("print(1)", metadata={"tags": [CHECK_TAG]})
    checked.execution_count = 3
    checked.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="1"),
        nbformat.v4.new_output("stream", name="stdout", text="\n"),
    ]
    checked.metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00"}
    plain = nbformat.v4.new_code_cell("print(2)")
    plain.execution_count = 4
    plain.outputs = [nbformat.v4.new_output("stream", name="stdout", text="2\n")]
    notebook.cells = [checked, plain]
    cleaner.clean(notebook)
    assert "widgets" not in notebook.metadata
    assert checked.execution_count == 3 and [o["text"] for o in checked.outputs] == ["1\n"]
    assert "execution" not in checked.metadata
    assert plain.outputs == [] and plain.execution_count is None
