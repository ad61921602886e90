"""What ``--image`` names, as a list of items: image files, URLs, folders, globs and PDF pages.

``collect_items`` turns what the user typed into ``Item``s (one per image file or PDF page) whose
pixels are only read when ``item.load()`` is called.
"""

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pypdfium2 as pdfium

from ..api.images import load_image
from ..errors import ImageLoadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
PDF_SCALE = 2.0  # PDF pages are 72 points per inch: scale 2 renders them at 144 dpi


@dataclass
class Item:
    """One image to process: a file, a URL, or one page of a PDF (``page`` counts from 1)."""

    source: str
    page: int | None = None
    loader: Callable | None = None  # how to read the pixels; default: load_image(source)

    @property
    def key(self) -> tuple[str, int | None]:
        """What identifies this item in an output file (used to skip finished items on a re-run)."""
        return (self.source, self.page)

    @property
    def label(self) -> str:
        return self.source if self.page is None else f"{self.source} (page {self.page})"

    def load(self):
        """Read the image (an RGB PIL image). Raises ImageLoadError if it cannot be read."""
        return self.loader() if self.loader else load_image(self.source)


def is_url(spec: str) -> bool:
    """True for anything with a scheme (``https://...``); load_image rejects the unsupported ones."""
    return "://" in spec


def is_multi_input(spec: str) -> bool:
    """True when ``--image`` names many images (a folder, a glob pattern or a PDF): JSONL output."""
    if is_url(spec):
        return False
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".pdf"):
        return True
    return not path.exists() and glob.has_magic(spec)


def collect_items(spec: str, pdf_scale: float = PDF_SCALE) -> list[Item]:
    """Turn an ``--image`` argument into the list of items to process.

    * an ``http(s)://`` URL or an image file -> one item;
    * a PDF -> one item per page;
    * a folder -> its image files and PDFs (not its sub-folders), sorted by name;
    * a glob pattern such as ``"scans/*.png"`` or ``"scans/**/*.jpg"`` -> the matching image files
      and PDFs, sorted. Quote the pattern so that your shell does not expand it.

    Raises ImageLoadError when nothing is there (missing file, empty folder, pattern without matches).
    """
    if is_url(spec):
        return [Item(spec)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_supported(p))
        if not files:
            raise ImageLoadError(f"The folder '{path}' contains no image or PDF files ({_suffix_list()}).")
        return _items_for_files(files, pdf_scale, strict=False)
    if path.exists():
        return _items_for_files([path], pdf_scale, strict=True)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in files if p.is_file() and _is_supported(p)]
        if not files:
            raise ImageLoadError(f"No image or PDF files match the pattern '{spec}' ({_suffix_list()}).")
        return _items_for_files(files, pdf_scale, strict=False)
    raise ImageLoadError(
        f"No file or folder at '{path}'. Check the spelling; relative paths start from the current "
        f"directory, which is '{Path.cwd()}'."
    )


def _items_for_files(files: list[Path], pdf_scale: float, strict: bool) -> list[Item]:
    """Items for image files and PDF pages. A PDF that cannot be opened raises when it was the only
    input (``strict``); among many files it becomes one item that fails (and is reported) when loaded."""
    items = []
    for path in files:
        if path.suffix.lower() != ".pdf":
            items.append(Item(str(path)))
            continue
        try:
            items.extend(pdf_items(path, pdf_scale))
        except ImageLoadError as error:
            if strict:
                raise
            items.append(Item(str(path), loader=_raiser(error)))
    return items


def item_at(source: str, page: int | None = None, pdf_scale: float = PDF_SCALE) -> Item:
    """The item that ``collect_items`` made for the key ``(source, page)``, rebuilt from the key alone.

    Lets another process (a Ray replica) read the pixels of an item it was sent as two plain values.
    A PDF without a page number is one that could not be opened: loading it raises the same error.
    """
    if page is not None:
        return Item(source, page, loader=_page_loader(Path(source), page, pdf_scale))
    if not is_url(source) and Path(source).suffix.lower() == ".pdf":
        return _items_for_files([Path(source)], pdf_scale, strict=False)[0]
    return Item(source)


def pdf_items(path: Path, scale: float = PDF_SCALE) -> list[Item]:
    """One item per page of the PDF at ``path``; pages are rendered only when loaded."""
    count = _pdf_page_count(path)
    if count == 0:
        raise ImageLoadError(f"The PDF '{path}' has no pages.")
    return [Item(str(path), page=n, loader=_page_loader(path, n, scale)) for n in range(1, count + 1)]


def render_pdf_page(path, page: int, scale: float = PDF_SCALE):
    """Render page ``page`` (counting from 1) of a PDF as an RGB PIL image with pypdfium2."""
    document = _open_pdf(path)
    try:
        bitmap = document[page - 1].render(scale=scale)
        return bitmap.to_pil().convert("RGB")
    except pdfium.PdfiumError as error:
        raise ImageLoadError(f"Could not render page {page} of '{path}': {error}") from None
    finally:
        document.close()


def _pdf_page_count(path: Path) -> int:
    document = _open_pdf(path)
    try:
        return len(document)
    finally:
        document.close()


def _open_pdf(path):
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        raise ImageLoadError(f"Could not open '{path}' as a PDF ({error}). Is the file complete and not encrypted?") from None


def _page_loader(path: Path, page: int, scale: float) -> Callable:
    return lambda: render_pdf_page(path, page, scale)


def _raiser(error: Exception) -> Callable:
    def load():
        raise error

    return load


def _is_supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == ".pdf"


def _suffix_list() -> str:
    return " ".join(sorted(IMAGE_SUFFIXES | {".pdf"}))
