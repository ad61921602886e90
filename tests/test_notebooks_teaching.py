"""What the notebooks and their READMEs tell a learner or a teacher: hints that do not give the answer
away, numbers labelled as estimates where nobody measured them, and the plan for a workshop.

The notebooks' code is run by nbval (``pytest notebooks``); these tests read their text.
"""

import ast
import builtins
import re
from pathlib import Path

import nbformat
import pytest
from transformers import AutoProcessor

from phi_helpers import build_prompt, load_image
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


def _code_after(name: str, heading: str) -> str:
    """The first code cell after the markdown cell that holds ``heading``."""
    cells = _cells(name)
    start = next(index for index, cell in enumerate(cells) if cell.cell_type == "markdown" and heading in cell.source)
    return next(cell.source for cell in cells[start:] if cell.cell_type == "code")


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


# --- opening what the notebooks cite: ./run.sh lab serves the repository, the lab opens on notebooks/ ---

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # a markdown link [text](target)
CITED_FILE = re.compile(r"(?:docs/[\w.-]+\.md|benchmarks/[\w.-]+\.py|images/README\.md)")  # repository files cited
LAB = re.compile(r"exec jupyter lab --notebook-dir=(\S+) --LabApp\.default_url=/lab/tree/(\S+)")


def _lab_root_and_start() -> tuple[Path, Path]:
    """The folder `./run.sh lab` serves (JupyterLab opens no file outside it) and the one it opens on."""
    served = LAB.search((REPO / "run.sh").read_text(encoding="utf-8"))
    assert served, "run.sh's lab command names no root and start folder"
    root = (REPO / served.group(1)).resolve()
    return root, (root / served.group(2)).resolve()


def test_run_sh_opens_the_lab_on_the_notebooks_with_the_repository_as_its_root():
    """Before: notebooks/ was the root, so docs/ and benchmarks/ could not be opened from JupyterLab."""
    assert _lab_root_and_start() == (REPO, NOTEBOOKS)


@pytest.mark.parametrize("name", [
    *(path.name for path in sorted(NOTEBOOKS.glob("*.ipynb"))),
    "README.md",
])
def test_the_files_a_notebook_cites_are_links_that_open_in_the_lab(name):
    """docs/scaling.md as code text cannot be clicked; a link opens it in JupyterLab if the file is inside
    the folder that ./run.sh lab serves."""
    root, _start = _lab_root_and_start()
    path = NOTEBOOKS / name
    texts = [path.read_text(encoding="utf-8")] if path.suffix == ".md" else [
        cell.source for cell in _cells(name) if cell.cell_type == "markdown"]
    for text in texts:
        for target in LINK.findall(text):
            if "://" not in target:
                file = (NOTEBOOKS / target.split("#")[0]).resolve()
                assert file.is_file() and file.is_relative_to(root), f"{name}: the link {target} opens nothing"
        unlinked = CITED_FILE.search(LINK.sub("", text))
        assert unlinked is None, f"{name}: {unlinked.group()} is cited as text, not as a link"


def test_every_setup_section_says_to_run_the_notebook_in_order():
    """Before: a cell run before the setup cell stopped with a bare NameError and no hint why."""
    setups = {path.name: cell.source for path in sorted(NOTEBOOKS.glob("*.ipynb")) for cell in _cells(path.name)
              if cell.cell_type == "markdown" and cell.source.startswith("## Setup")}
    assert len(setups) == 7
    for name, text in setups.items():
        assert "Run the notebook top to bottom (Run > Run All Cells" in text, name


def test_02b_points_to_the_section_that_checks_the_fields_against_the_mrz():
    """Before: section 1 promised the MRZ check "in section 5"; it is in section 4 (there is no 5)."""
    text = _markdown("02b_structured_extraction.ipynb")
    promised = re.search(r"check the other fields\s+in section (\d+)", _section(text, "## 1. ")).group(1)
    assert "check_fields" in _code_after("02b_structured_extraction.ipynb", f"## {promised}. ")


# --- num_crops: Phi-3.5-vision loads 4 crops per image, Phi-3-vision 16 (docs/phi3v-architecture.md §10) ---


@pytest.mark.parametrize("loaded", [4, 16], ids=["Phi-3.5-vision", "Phi-3-vision"])
def test_notebook_03_changes_num_crops_to_a_setting_it_did_not_load(loaded, tiny_checkpoint, monkeypatch, capsys):
    """Section 5 shows the cost of another num_crops; "16" was no change where 16 is what was loaded."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=loaded)
    monkeypatch.chdir(NOTEBOOKS)
    cell = _code_after("03_multi_image.ipynb", "## 5. Changing num_crops")
    exec(cell, _section_5_names(processor, loaded))  # without section 3's image_processor: that cell may be skipped
    counts = dict(re.findall(r"num_crops=(\d+): (\d+) image tokens", capsys.readouterr().out))
    assert str(loaded) in counts and len(counts) == 2 and len(set(counts.values())) == 2, counts
    assert processor.image_processor.num_crops == loaded  # set back for the rest of the notebook


def _section_5_names(processor, loaded: int) -> dict:
    """What notebook 03's section 5 cell finds from the cells above it: the setup cell, sections 1 and 2."""
    return {"processor": processor, "loaded_num_crops": loaded, "build_prompt": build_prompt, "question": "What changed?",
            "scene_1": load_image("images/scene_1.png"), "scene_2": load_image("images/scene_2.png")}


def test_notebook_03_sets_num_crops_back_when_the_cell_is_stopped_or_run_again(tiny_checkpoint, monkeypatch):
    """Before: a stop (or an error) inside the loop left num_crops at 16, and running the cell again took that
    16 from the processor as the value to set back, so it stayed for the rest of the notebook."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=4)
    monkeypatch.chdir(NOTEBOOKS)
    cell = _code_after("03_multi_image.ipynb", "## 5. Changing num_crops")

    class StoppedAtTheSecondSetting:
        """The processor, with the kernel's stop button pressed while it prepares the second setting's images."""
        image_processor, image_token_id = processor.image_processor, processor.image_token_id
        calls = 0

        def __call__(self, **kwargs):
            StoppedAtTheSecondSetting.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return processor(**kwargs)

    with pytest.raises(KeyboardInterrupt):
        exec(cell, _section_5_names(StoppedAtTheSecondSetting(), loaded=4))
    assert processor.image_processor.num_crops == 4
    processor.image_processor.num_crops = 16  # left so by other code (an exercise without `finally`)
    exec(cell, _section_5_names(processor, loaded=4))
    assert processor.image_processor.num_crops == 4  # the loaded value, not the one the cell found


@pytest.mark.parametrize("loaded", [4, 16], ids=["Phi-3.5-vision", "Phi-3-vision"])
def test_the_05_solution_times_two_different_num_crops(loaded, monkeypatch, capsys):
    """The default (None) and 16 are the same prompt with Phi-3-vision: nothing to compare."""
    asked = []

    def compare_attention(**kwargs):  # records the setting instead of loading the model
        asked.append(kwargs["num_crops"])
        return [{"attention": "sdpa", "available": True, "first_token_s": 1.0}]

    monkeypatch.setattr("phi_helpers.tutorial.profiling.compare_attention", compare_attention)
    monkeypatch.setattr("phi_helpers.tutorial.profiling.attention_table", lambda rows: "")
    monkeypatch.setattr("phi_helpers.api.loading.checkpoint_num_crops", lambda model_id=None: loaded)
    monkeypatch.chdir(NOTEBOOKS)
    exec(_code_after("solutions.ipynb", "## 05_without_flash_attention"), {})  # no setup cell: see the intro
    used = [loaded if num_crops is None else num_crops for num_crops in asked]
    assert len(used) == 2 and loaded in used and len(set(used)) == 2, used
    counts = dict(re.findall(r"num_crops=(\d+) \(([\d,]+) image tokens\)", capsys.readouterr().out))
    assert counts == {"4": "757", "16": "1,921"}  # the chart's, as the section's text says


def _names(source: str) -> tuple[set, set]:
    """The names a cell defines (assigned, imported, def, for, except ... as) and the names it reads."""
    defined, read = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    return defined, read


def test_each_solution_needs_only_the_setup_cell_and_its_own_cells():
    """The intro: sections 00 to 04 use the setup cell, 05 and 06 not even that. Before: the 02b solution read
    the `receipt` of the 02 section, and the 05 solution `load_image` and `processor` of the setup cell."""
    intro = _cells("solutions.ipynb")[0].source
    assert "Sections 05 and 06 load the model themselves" in intro and "they do not need the setup cell" in intro
    sections, heading = {}, None
    for cell in _cells("solutions.ipynb"):
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            heading = cell.source.splitlines()[0][3:].split(":")[0]
            sections[heading] = []
        elif cell.cell_type == "code":
            sections[heading].append(cell.source)
    setup, _ = _names("\n".join(sections.pop("Setup")))
    assert {"model", "processor", "load_image"} <= setup
    for heading, sources in sections.items():
        defined, read = _names("\n".join(sources))
        given = set(dir(builtins)) | {"display"} | (set() if heading[:2] in ("05", "06") else setup)
        assert read <= defined | given, f"{heading} reads {sorted(read - defined - given)} from another section"


@pytest.mark.parametrize("name", ["00_setup.ipynb", "01_image_analysis.ipynb", "02_ocr_and_documents.ipynb",
                                  "02b_structured_extraction.ipynb", "03_multi_image.ipynb", "04_multi_turn_chat.ipynb", "solutions.ipynb"])
def test_the_cell_that_loads_the_model_says_to_run_it_once(name):
    """Running it again holds two models until the new one is loaded: fp32 twice does not fit a 23 GB machine."""
    cells = _cells(name)
    load = next(index for index, cell in enumerate(cells) if "model, processor = load_model(" in cell.source)
    before = " ".join(cells[load - 1].source.split())
    assert "Run the cell that loads the model only once" in before and "restart the kernel first" in before


@pytest.mark.parametrize(("name", "heading"), [
    ("02_ocr_and_documents.ipynb", "## 2. "),
    ("03_multi_image.ipynb", "## Exercise"),
    ("05_without_flash_attention.ipynb", "## 1. "),
    ("05_without_flash_attention.ipynb", "## Exercise"),
    ("solutions.ipynb", "## 05_without_flash_attention"),
])
def test_where_the_default_num_crops_matters_both_checkpoints_are_named(name, heading):
    text = " ".join(_section(_markdown(name), heading).split())  # lines joined
    assert "4 for Phi-3.5-vision" in text and "16 for Phi-3-vision" in text, text


def test_notebook_03_says_that_multi_image_questions_are_phi_3_5_visions():
    """Phi-3-vision's intended use is one image; Phi-3.5-vision's card adds multi-image comparison."""
    opening = _cells("03_multi_image.ipynb")[0].source.split("## What you will learn")[0]
    assert "Phi-3.5-vision" in opening and "single image" in opening and "weaker" in opening


def test_the_timing_guide_says_phi_3_vision_prompts_are_longer():
    timing = _section(NOTEBOOKS_README, "## How long do they take?")
    assert "Phi-3-vision" in timing and "1,921" in timing and "757" in timing


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
