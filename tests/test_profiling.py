"""compare_attention / attention_table (notebook 05) on the tiny random checkpoint, on CPU."""

import pytest
from PIL import Image

from phi_helpers.api.choices import ATTENTIONS
from phi_helpers.tutorial.profiling import ATTENTION_OPTIONS, compare_attention, attention_table


@pytest.fixture(scope="module")
def rows(_no_override, tiny_checkpoint):
    image = Image.new("RGB", (200, 120), "white")
    return compare_attention(
        model_id=str(tiny_checkpoint), image=image, question="What is in this image?", max_new_tokens=4,
        device="cpu", verbose=False,
    )


@pytest.fixture(autouse=True, scope="module")
def _no_override():
    """PHI_HELPERS_MODEL would replace the checkpoint path; these tests pass the path themselves."""
    mp = pytest.MonkeyPatch()
    mp.delenv("PHI_HELPERS_MODEL", raising=False)
    yield
    mp.undo()


def test_rows_for_every_option_in_order(rows):
    assert [row["attention"] for row in rows] == ["eager", "sdpa", "flash_attention_2"]


@pytest.mark.parametrize("option", ["eager", "sdpa"])
def test_available_options_are_timed(rows, option):
    row = next(r for r in rows if r["attention"] == option)
    assert row["available"] and row["reason"] is None
    assert row["device"] == "cpu" and row["dtype"] == "float32"
    assert row["new_tokens"] >= 1
    assert 0 < row["first_token_s"] <= row["total_s"]
    assert row["load_s"] > 0
    assert row["peak_memory_gib"] > 0 and "cumulative" in row["memory_note"]
    assert isinstance(row["answer"], str)


def test_flash_attention_is_not_available_on_cpu(rows):
    row = rows[-1]
    assert row["available"] is False
    assert "CUDA" in row["reason"] or "NVIDIA" in row["reason"]
    assert row["total_s"] is None


def test_eager_and_sdpa_agree_greedily(rows):
    answers = {row["attention"]: row["answer"] for row in rows if row["available"]}
    assert answers["eager"] == answers["sdpa"]


def test_attention_table_names_every_option(rows):
    table = attention_table(rows)
    for name in ("eager", "sdpa", "flash_attention_2", "not available", "cumulative"):
        assert name in table


def test_unknown_option_is_reported_not_raised(_no_override, tiny_checkpoint):
    rows = compare_attention(model_id=str(tiny_checkpoint), options=["flash_attention_3"], device="cpu", verbose=False)
    assert rows[0]["available"] is False and "Unknown attention" in rows[0]["reason"]


def test_one_name_is_one_option_not_its_letters(_no_override, tiny_checkpoint):
    rows = compare_attention(model_id=str(tiny_checkpoint), options="flash_attention_2", device="cpu", verbose=False)
    assert [row["attention"] for row in rows] == ["flash_attention_2"]


def test_an_unknown_option_names_the_valid_ones(_no_override, tiny_checkpoint):
    [row] = compare_attention(model_id=str(tiny_checkpoint), options=["flash"], device="cpu", verbose=False)
    assert row["reason"] == "Unknown attention 'flash'. Choose one of 'auto', 'sdpa', 'eager', 'flash_attention_2'."


def test_the_options_are_load_models_choices_eager_first():
    assert ATTENTION_OPTIONS == ("eager", "sdpa", "flash_attention_2")
    assert set(ATTENTION_OPTIONS) == set(ATTENTIONS) - {"auto"}


def test_quantize_is_passed_to_load_model(capsys, tiny_checkpoint):
    """Before: compare_attention had no quantize=, so a 16 GB laptop that loads int8 in notebook 00 could not
    run notebook 05's comparison at all."""
    pytest.importorskip("torchao")
    [row] = compare_attention(model_id=str(tiny_checkpoint), options="sdpa", device="cpu", quantize="int8", max_new_tokens=2)
    assert row["available"] and row["dtype"] == "bfloat16"  # int8 weights compute in bf16 on the CPU
    assert "int8" in capsys.readouterr().out  # load_model's summary line, shown under the option


def test_an_unknown_quantize_is_refused_before_any_model_loads(tiny_checkpoint):
    from phi_helpers.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="quantize"):
        compare_attention(model_id=str(tiny_checkpoint), options="sdpa", device="cpu", quantize="int3")
