"""What the notebooks and their READMEs tell a learner or a teacher: hints that do not give the answer
away, numbers labelled as estimates where nobody measured them, and the plan for a workshop.

The notebooks' code is run by nbval (``pytest notebooks``); these tests read their text.
"""

import re
from pathlib import Path

import nbformat
import pytest

from phi_helpers.api.constrained import allowed_next_tokens, compile_schema

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
LESSONS = [path for path in sorted(NOTEBOOKS.glob("*.ipynb")) if path.name != "solutions.ipynb"]
README = (REPO / "README.md").read_text(encoding="utf-8")
NOTEBOOKS_README = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")


def _cells(name: str) -> list:
    return nbformat.read(NOTEBOOKS / name, as_version=4).cells


def _markdown(name: str) -> str:
    return "\n\n".join(cell.source for cell in _cells(name) if cell.cell_type == "markdown")


def _exercise(name: str) -> str:
    return next(cell.source for cell in _cells(name) if re.search(r"^#+\s*Exercise", cell.source, re.MULTILINE))


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading)
    following = re.search(rf"^{level} ", text[start + len(heading):], re.MULTILINE)
    return text[start:start + len(heading) + following.start()] if following else text[start:]


def _table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # without the header and the |---| line


# --- the notebooks ----------------------------------------------------------------------------------


def test_the_02_hint_shows_a_made_up_value_not_the_receipts():
    """A format example with the true subtotal lets the model copy it instead of reading it."""
    exercise = _exercise("02_ocr_and_documents.ipynb")
    assert "Subtotal: " in exercise
    for true_value in ("28.60", "2.29", "30.89"):  # images/README.md
        assert true_value not in exercise


def test_the_02b_hint_bounds_numbers_on_both_sides():
    exercise = _exercise("02b_structured_extraction.ipynb")
    assert re.search(r'"minimum": \d+, "maximum": \d+', exercise)
    assert "both bounds" in _markdown("02b_structured_extraction.ipynb").split("## 4.")[0]  # said in section 3


def test_a_number_needs_both_bounds_as_the_notebook_says(cli_model_and_processor):
    """02b section 3: with only a minimum a number can grow digit after digit; a maximum caps it."""
    _model, processor = cli_model_and_processor
    tokenizer = processor.tokenizer

    def digits_allowed_after(total_schema, text):
        schema = {"type": "object", "properties": {"total": total_schema}, "required": ["total"]}
        grammar = compile_schema(tokenizer, schema, 32064, [32007])
        return any(token.strip("▁").isdigit() for token in allowed_next_tokens(tokenizer, grammar, text))

    assert digits_allowed_after({"type": "number", "minimum": 0}, '{"total":123456789')
    assert not digits_allowed_after({"type": "number", "minimum": 0, "maximum": 1000}, '{"total":999')


def test_the_mask_cost_is_stated_as_measured():
    """docs/structured-output.md measured 0.59 ms per token: not microseconds."""
    text = _markdown("02b_structured_extraction.ipynb")
    assert "microsecond" not in text and "under a\nmillisecond" in text


def test_notebook_02_points_to_the_crops_that_small_text_needs():
    text = _markdown("02_ocr_and_documents.ipynb")
    assert "num_crops" in text and "notebook 03" in text


def test_notebook_05_says_the_tiny_models_timings_mean_nothing():
    assert "With the tiny dry-run model the timings mean nothing" in _markdown("05_without_flash_attention.ipynb")


def test_notebook_06_warns_that_every_replica_holds_a_model():
    cells = _cells("06_scaling_up.ipynb")
    run = next(index for index, cell in enumerate(cells) if "predict_dataset(dataset" in cell.source)
    before = cells[run - 1].source
    assert "own copy of the model" in before and 'replicas=1` with `quantize="int8"' in before
    assert "a second replica waits for a second GPU" in before


def test_notebook_06_promises_the_dashboard_only_where_it_is_installed():
    goals = _section(_cells("06_scaling_up.ipynb")[0].source, "## What you will learn")
    dashboard = [line for line in goals.splitlines() if "dashboard" in line]
    assert dashboard and all('ray[default]' in line for line in dashboard)


def test_the_06_exercise_makes_the_fields_a_document_lacks_optional():
    exercise = _exercise("06_scaling_up.ipynb")
    assert "optional" in exercise and '"required"' in exercise


# --- README.md and notebooks/README.md -----------------------------------------------------------------


def test_the_timing_guide_has_a_row_for_every_notebook():
    rows = _table_rows(_section(NOTEBOOKS_README, "## How long do they take?"))
    assert [row[0].strip("`") for row in rows] == [path.stem for path in LESSONS] + ["solutions"]
    header = _section(NOTEBOOKS_README, "## How long do they take?").split("\n|")[1]
    assert "(estimate)" in header and "(measured)" in header


@pytest.mark.parametrize("text", [README, NOTEBOOKS_README], ids=["README.md", "notebooks/README.md"])
def test_one_gpu_figure_and_the_gpu_path_said_to_be_unmeasured(text):
    """bf16 needs 8.3 GiB with activations: "fits" on 12 GB, "tight" on 10 (docs/quantization.md)."""
    figures = set(re.findall(r"GPU(?: with)? \(?(?:≥ |~)?(\d+) GB", text))
    assert figures == {"12"}
    assert re.search(r"not run (?:by this project|them on a GPU)|has not run them on a GPU", text)


def test_cpu_speeds_are_labelled_as_estimates():
    for text in (README, NOTEBOOKS_README):
        for paragraph in re.split(r"\n\s*\n|\n- ", text):
            if re.search(r"per (?:generated )?token", paragraph) and "minute" in paragraph:
                assert "estimate" in paragraph, paragraph


def test_the_teachers_section_plans_the_workshop():
    teachers = _section(NOTEBOOKS_README, "## For teachers")
    for needed in ("./run.sh test", 'quantize="int8"', "ipywidgets", "Kernel > Shut Down Kernel",
                   "hf download microsoft/Phi-3.5-vision-instruct --local-dir", "PHI_HELPERS_MODEL=/path/to/",
                   "show real answers from one GPU machine", "solutions.ipynb"):
        assert needed in teachers, needed
    rows = _table_rows(_section(teachers, "### Which sections need the real model?"))
    assert [row[0] for row in rows] == [path.stem.split("_")[0] for path in LESSONS] + ["solutions"]
    assert "For teachers" in README  # the README's "No GPU" advice points there
