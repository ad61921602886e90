"""PDF inputs of the command line: each PDF that cannot be used gets its own reason, whatever was opened before."""

import io
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from test_hostile_inputs import encrypted_pdf, minimal_pdf

from phi_helpers.cli import inputs
from phi_helpers.errors import ImageLoadError


def no_pages_pdf() -> bytes:
    """A well-formed PDF without a page (what PDFium itself writes for a new, empty document)."""
    buffer = io.BytesIO()
    pdfium.PdfDocument.new().save(buffer)
    return buffer.getvalue()


@pytest.fixture
def pdfs(tmp_path) -> dict[str, Path]:
    contents = {
        "good": minimal_pdf("0 0 100 50"),
        "locked": encrypted_pdf(),
        "no_pages": no_pages_pdf(),
        "damaged": b"%PDF-1.4\nthis is not the rest of a PDF\n",
    }
    paths = {name: tmp_path / f"{name}.pdf" for name in contents}
    for name, data in contents.items():
        paths[name].write_bytes(data)
    return paths


MESSAGES = {
    "locked": "The PDF '{}' is encrypted (password-protected). Save an unprotected copy and use that.",
    "no_pages": "The PDF '{}' has no pages.",
    "damaged": "Could not open '{}' as a PDF: it is damaged or not a PDF. Re-save or re-download it.",
}
ORDERS = [["no_pages"], ["locked", "no_pages"], ["damaged", "no_pages", "locked"], ["locked", "damaged", "no_pages"]]


def message_of(action, *args) -> str:
    with pytest.raises(ImageLoadError) as caught:
        action(*args)
    return str(caught.value)


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_each_unusable_pdf_gets_its_own_reason_in_any_order(pdfs, order):
    for name in order:  # PDFium keeps the last error code: it must not leak into the next file's message
        assert message_of(inputs.collect_items, str(pdfs[name])) == MESSAGES[name].format(pdfs[name])


def test_a_folder_of_pdfs_fails_only_the_unusable_ones(pdfs, tmp_path):
    items = {Path(item.source).stem: item for item in inputs.collect_items(str(tmp_path))}
    assert items["good"].load().size == (200, 100)
    for name, message in MESSAGES.items():
        assert message_of(items[name].load) == message.format(pdfs[name])


def test_a_huge_page_says_what_a_command_line_user_can_do(tmp_path):
    path = tmp_path / "poster.pdf"
    path.write_bytes(minimal_pdf("0 0 20000 10000"))  # 277.8 x 138.9 inches: 40,000 x 20,000 pixels at 144 dpi
    (item,) = inputs.collect_items(str(path))
    message = message_of(item.load)
    assert message.startswith(f"Refusing to decode page 1 of '{path}' (20000 x 10000 points = 277.8 x 138.9 inches, "
                              "rendered at 144 dpi)")
    assert "40,000 x 20,000 = 800,000,000 pixels" in message
    assert "Split the PDF" in message and "scale its pages down" in message  # what works from the command line
    assert message.endswith("In your own Python code, if you trust this file, you can raise PIL.Image.MAX_IMAGE_PIXELS first.")
