"""What ``--image`` names, as a list of items: image files, URLs, folders, globs and the pages of PDFs
and multi-page TIFFs.

``collect_items`` turns what the user typed into ``Item``s (one per image file or document page) whose
pixels are only read when ``item.load()`` is called. ``collect_all`` does it for several values and says
in one line on stderr what folders and patterns left out (``LeftOut``).
"""

import fnmatch
import glob
import os
import stat
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from ..api.images import (
    check_pixel_count, count_pages, is_missing, load_image, load_page, missing_error, shown_url, unreadable_error,
    url_scheme,
)
from ..errors import ImageLoadError, expand_home

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif"}
# Image files Pillow cannot read: folders and patterns leave them out with a warning that says what to do
# (named one by one, each is an item whose error says what it is).
UNREADABLE_SUFFIXES = {".heic": "HEIC/HEIF", ".heif": "HEIC/HEIF", ".svg": "SVG"}
TIFF_SUFFIXES = {".tif", ".tiff"}  # files that may hold several pages (a scanned fax): counted when listed
PDF_SCALE = 2.0  # PDF pages are 72 points per inch: scale 2 renders them at 144 dpi
PDF_PAGE_TOO_LARGE = ("Split the PDF so that this page is left out, or scale its pages down to a usual paper size "
                      "(e.g. print it to a PDF on A4 or Letter)")
PDF_LOAD_ERRORS = {  # FPDF_GetLastError() after a failed FPDF_LoadDocument -> what the user reads
    pdfium_c.FPDF_ERR_FILE: "Could not read '{path}'. Check that you may read it.",
    pdfium_c.FPDF_ERR_FORMAT: "Could not open '{path}' as a PDF: it is damaged or not a PDF. Re-save or re-download it.",
    pdfium_c.FPDF_ERR_PASSWORD: "The PDF '{path}' is encrypted (password-protected). Save an unprotected copy and use that.",
    pdfium_c.FPDF_ERR_SECURITY: "The PDF '{path}' is encrypted with a security scheme PDFium does not support. Save an "
    "unprotected copy and use that.",
}


@dataclass
class Item:
    """One image to process: a file, a URL, or one page of a PDF or of a multi-page TIFF (``page`` counts
    from 1; a one-page TIFF is an image, without a page).

    ``collect_all`` also notes a local file's absolute ``path`` and its modification time
    (``modified``, in ns) as they were when the items were collected: an output line records both, so
    that a re-run from another folder finds the same file, and a file saved over since is run again.
    """

    source: str
    page: int | None = None
    loader: Callable | None = None  # how to read the pixels; default: load_image(path or source)
    path: str | None = None
    modified: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        """What identifies this item in an output file (used to skip finished items on a re-run)."""
        return (self.source, self.page)

    def load(self):
        """Read the image (an RGB PIL image). Raises ImageLoadError if it cannot be read.

        The file is read at its absolute ``path`` when there is one (a Ray replica runs in another
        folder), but the error names it by ``source``, as the user typed it, in both engines.
        """
        try:
            return self.loader() if self.loader else load_image(self.path or self.source)
        except ImageLoadError as error:
            typed, read = f"'{self.source}'", f"'{self.path}'"
            if self.path is None or read == typed or read not in str(error):
                raise
            raise type(error)(str(error).replace(read, typed)) from None


def stamped(item: Item) -> Item:
    """``item`` with the absolute ``path`` and the ``modified`` time of its local file as they are now
    (taken before the file is read: a change while it is read shows on the next run); a URL, or a
    file that cannot be seen, as it is."""
    if is_url(item.source):
        return item
    try:
        status = os.stat(item.source)
    except OSError:
        return item
    return replace(item, path=os.path.abspath(item.source), modified=status.st_mtime_ns)


def is_url(spec: str) -> bool:
    """True for anything with a scheme (``https://...``, ``url_scheme``); load_image rejects the unsupported ones."""
    return url_scheme(spec) is not None


def is_pdf(path) -> bool:
    """True for a file name that ends in ``.pdf`` (any case)."""
    return Path(path).suffix.lower() == ".pdf"


def is_tiff(path) -> bool:
    """True for a file name that ends in ``.tif`` or ``.tiff`` (any case): one that may hold pages."""
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def is_multi_page_tiff(path) -> bool:
    """True for a TIFF file of more than one page (a document: one item per page, like a PDF). Only
    its headers are read. False for a TIFF that cannot be read: loading it says why."""
    if not is_tiff(path):
        return False
    try:
        return count_pages(path) > 1
    except ImageLoadError:
        return False


def check_not_empty(spec: str) -> None:
    """Refuse an empty or blank ``--image`` value (an unset shell variable), which as a path would be
    the current folder, with an ImageLoadError."""
    if not spec.strip():
        raise ImageLoadError(f"--image is empty ({spec!r}); give an image file, URL, folder, glob pattern or PDF "
                             "(is a shell variable unset?).")


def is_multi_input(spec: str) -> bool:
    """True when ``--image`` names many images (a folder, a glob pattern, a PDF or a multi-page TIFF):
    JSONL output.
    Raises ImageLoadError for an empty value (``check_not_empty``). A path that cannot be seen
    (permission denied) counts as one image, unless it is a pattern: reading it then fails with advice."""
    check_not_empty(spec)
    if is_url(spec):
        return False
    path = _expand(spec)
    try:
        status = _stat(path)
    except OSError:
        return glob.has_magic(spec)
    if status is None:
        return glob.has_magic(spec)
    if stat.S_ISDIR(status.st_mode):
        return True
    return stat.S_ISREG(status.st_mode) and (is_pdf(path) or is_multi_page_tiff(path))


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat(path)``, or None when nothing is there (where pathlib's ``exists()`` is False).

    Any other OSError (permission denied: a folder above it cannot be entered) is raised: pathlib's
    ``is_dir()`` and ``exists()`` raise it too (Python 3.11), and it must not be taken for "missing".
    """
    try:
        return os.stat(path)
    except ValueError:  # a NUL in the name: no file has one
        return None
    except OSError as error:
        if is_missing(error):
            return None
        raise


def collect_items(spec: str, strict: bool = True, left_out: "LeftOut | None" = None) -> list[Item]:
    """Turn an ``--image`` argument into the list of items to process.

    * an ``http(s)://`` URL or an image file -> one item (an animated GIF, PNG or WebP too: its first frame);
    * a PDF or a multi-page TIFF -> one item per page;
    * a folder -> its image files and PDFs (not its sub-folders), sorted by name;
    * a glob pattern such as ``"scans/*.png"`` or ``"scans/**/*.jpg"`` -> the matching image files
      and PDFs, sorted. Quote the pattern so that your shell does not expand it.

    Folders reached through a symbolic link are not entered (no symlink loops), and a file reached
    under several names (symbolic or hard links) is listed once, under its first name in sorted order.

    One bad item never stops the others: a file in a folder or matched by a pattern that cannot be
    read (permission denied) is an item that fails, with advice, when it is loaded. Under a pattern, a
    sub-folder that cannot be listed is left out with a warning on stderr (``warn_unlisted``).
    ``spec`` itself, when it cannot be read (a file, the folder, or the folder a pattern starts in),
    raises ImageLoadError with advice if ``strict`` (it is the only input), else is one failing item,
    like an unusable PDF or TIFF.

    ``left_out``: a ``LeftOut`` that gets what a folder or a pattern left out (``collect_all`` reports it).

    Raises ImageLoadError when ``spec`` is empty or blank, names the home folder of a user that does not
    exist (``~nouser/x.png``), or nothing is there (missing file, a symbolic link to nothing or a loop of
    links, empty folder, pattern without matches).
    """
    check_not_empty(spec)
    if is_url(spec):
        return [Item(spec)]
    path = _expand(spec)
    try:
        status = _stat(path)
    except OSError as error:
        if glob.has_magic(spec):  # "locked/*.png": the walk says which folder cannot be listed
            return _pattern_items(spec, strict, left_out or LeftOut())
        return [_failed(path, unreadable_error(path, error), strict)]
    if status is not None and stat.S_ISDIR(status.st_mode):
        return _folder_items(path, strict, left_out or LeftOut())
    if status is not None:
        return _items_for_files([path], strict=strict)
    if glob.has_magic(spec):
        return _pattern_items(spec, strict, left_out or LeftOut())
    raise missing_error(path, "file or folder")


def _expand(spec: str) -> Path:
    """The path an ``--image`` value names, ``~`` expanded (``expand_home``: ImageLoadError for ``~nouser``)."""
    return expand_home(spec, "--image value", ImageLoadError)


def _folder_items(path: Path, strict: bool, left_out: "LeftOut") -> list[Item]:
    """The items of a folder's own image files and PDFs, sorted (``collect_items``). Hidden files (names
    that start with ".", such as the "._IMG_0.jpg" a Mac writes beside each file on other disks) are
    left out, as a glob leaves them out; so are files without an image or PDF suffix and what is not a
    regular file (a FIFO, a device, a broken or looping link), and sub-folders are not entered: all noted
    in ``left_out``."""
    try:
        everything = sorted(path.iterdir())
    except OSError as error:
        return [_failed(path, unreadable_error(path, error, folder=True), strict)]
    entries = [entry for entry in everything if not entry.name.startswith(".")]
    hidden = [entry for entry in everything if entry.name.startswith(".") and _is_file_or_unreadable(entry)]
    repeats = []
    files = _once([entry for entry in entries if is_supported(entry) and _is_file_or_unreadable(entry)], repeats=repeats)
    unreadable = [entry for entry in entries if entry.suffix.lower() in UNREADABLE_SUFFIXES and _is_file_or_unreadable(entry)]
    no_suffix = [entry for entry in entries if _has_no_known_suffix(entry) and _is_file_or_unreadable(entry)]
    sub_folders = [entry for entry in entries if _is_folder(entry)]
    not_regular = [entry for entry in entries if not (_is_file_or_unreadable(entry) or _is_folder(entry))]
    if not files:
        hint = _no_suffix_hint(no_suffix, hidden, not_regular) + (f"; {_left_out(unreadable)}" if unreadable else "")
        if sub_folders:
            hint += f"; for the files of its sub-folders use a pattern (quoted): --image '{path / '**' / '*.png'}'"
        raise ImageLoadError(f"The folder '{path}' contains no image or PDF files ({_suffix_list()}){hint}.")
    warn_left_out(unreadable, str(path))
    left_out.add(no_suffix=no_suffix, hidden=hidden, unreadable=unreadable, not_regular=not_regular, repeats=repeats)
    if sub_folders:
        left_out.sub_folders[str(path)] = [str(folder) for folder in sub_folders]
    return _items_for_files(files, strict=False)


def _pattern_items(spec: str, strict: bool, left_out: "LeftOut") -> list[Item]:
    """The items of the files that the glob pattern ``spec`` matches (``collect_items``); what it matches
    but leaves out (no image or PDF suffix, a hidden name, not a regular file) is noted in ``left_out``."""
    found, hidden_matches, repeats, not_regular = [], [], [], []
    matches = glob_files(spec, found, hidden=hidden_matches, not_regular=not_regular)
    files = _once([p for p in matches if is_supported(p)], repeats=repeats)
    unreadable = [p for p in matches if p.suffix.lower() in UNREADABLE_SUFFIXES]
    no_suffix = [p for p in matches if _has_no_known_suffix(p)]
    unlisted = [error for error in found if not is_missing(error)]  # a missing folder just matches nothing
    root = glob_root(spec)
    for error in unlisted:
        if Path(error.filename) == root:  # the folder the pattern starts in: none of its files can be seen
            return [_failed(root, unreadable_error(root, error, folder=True), strict)]
    warn_unlisted(unlisted, spec)
    hidden = [p for p in hidden_matches if p.name.startswith(".")]
    in_hidden_folders = [p for p in hidden_matches if not p.name.startswith(".")]
    if not files:
        hint = (_no_suffix_hint(no_suffix, hidden + in_hidden_folders, not_regular)
                + (f"; {_left_out(unreadable)}" if unreadable else ""))
        other_case = [path for path in glob_files(spec, ignore_case=True) if is_supported(path)]
        if other_case:  # a camera's IMG_0001.JPG for *.jpg: names differ by case here (Linux, macOS)
            hint += (f"; {counted(len(other_case), 'file')} would match but for the case of letters ({_names(other_case)}): "
                     "write the pattern with their case (e.g. '*.JPG'), or give the folder")
        raise ImageLoadError(f"No image or PDF files match the pattern '{spec}' ({_suffix_list()}){hint}.")
    warn_left_out(unreadable, spec)
    left_out.add(no_suffix=no_suffix, hidden=hidden, in_hidden_folders=in_hidden_folders, unreadable=unreadable,
                 not_regular=not_regular, repeats=repeats)
    return _items_for_files(files, strict=False)


def _has_no_known_suffix(path: Path) -> bool:
    """A file name that is neither an image or PDF name nor one of ``UNREADABLE_SUFFIXES`` (which have their
    own warning): ``scan_noext``, ``notes.txt``, ``Thumbs.db``."""
    return not is_supported(path) and path.suffix.lower() not in UNREADABLE_SUFFIXES


NOT_REGULAR = "not regular files (FIFOs, devices, broken or looping links)"  # what LeftOut.not_regular holds


def _no_suffix_hint(no_suffix: list[Path], hidden: list[Path], not_regular: list[Path]) -> str:
    """What a "no image or PDF files" message adds about the files that are there all the same."""
    hint = ""
    if no_suffix:
        hint += (f"; {counted(len(no_suffix), 'file')} without such a suffix ({_names(no_suffix)}): name an image "
                 "file on its own with --image to read it whatever its name, or rename it")
    if hidden:
        hint += f"; {counted(len(hidden), 'hidden file')} ({_names(hidden)}) left out, as a glob leaves them out"
    if not_regular:
        hint += f"; {len(not_regular)} {NOT_REGULAR} ({_names(not_regular)}) left out"
    return hint


@dataclass
class LeftOut:
    """What folders and patterns left out, by reason: ``collect_items`` notes it, ``collect_all`` says it
    in one line on stderr (``report``), so that nothing in a pile of files goes missing without a word."""

    no_suffix: list = field(default_factory=list)  # files without an image or PDF suffix (scan_noext, notes.txt)
    hidden: list = field(default_factory=list)  # hidden files (.DS_Store, ._IMG_0.jpg)
    in_hidden_folders: list = field(default_factory=list)  # files a pattern reaches only through a hidden folder
    unreadable: list = field(default_factory=list)  # HEIC/HEIF and SVG files (warn_left_out names them, with advice)
    not_regular: list = field(default_factory=list)  # FIFOs, devices, links to nothing and loops of links
    repeats: list = field(default_factory=list)  # more names of a file listed already (links; a file named twice)
    sub_folders: dict = field(default_factory=dict)  # a folder given to --image -> its sub-folders, not entered

    def add(self, **paths) -> None:
        """Append ``paths`` (lists of paths, by field name) to their lists, as text."""
        for name, found in paths.items():
            getattr(self, name).extend(str(path) for path in found)

    def report(self, items: list[Item]) -> str | None:
        """One line, e.g. "295 items from 292 files; 8 files left out (no image or PDF suffix: ...; hidden: ...);
        12 sub-folders of 'docs' not entered (...)", or None when nothing was left out."""
        reasons = [("no image or PDF suffix", self.no_suffix), ("hidden", self.hidden),
                   ("in hidden folders", self.in_hidden_folders), ("HEIC/HEIF or SVG, see above", self.unreadable),
                   (NOT_REGULAR, self.not_regular)]
        reasons = [(reason, names) for reason, names in reasons if names]
        parts = []
        if reasons:
            count = sum(len(names) for _, names in reasons)
            parts.append(f"{counted(count, 'file')} left out ("
                         + "; ".join(f"{reason}: {_names(names)}" for reason, names in reasons) + ")")
        if self.repeats:
            files = "a file" if len(self.repeats) == 1 else "files"
            parts.append(f"{counted(len(self.repeats), 'name')} of {files} listed already (a link, or a file named twice), "
                         f"skipped ({_names(self.repeats)})")
        for folder, sub_folders in self.sub_folders.items():
            parts.append(f"{counted(len(sub_folders), 'sub-folder')} of '{folder}' not entered ({_names(sub_folders)}; "
                         f"for their files too: --image '{Path(folder) / '**' / '*'}')")
        if not parts:
            return None
        files = len({item.source for item in items})
        return f"{counted(len(items), 'item')} from {counted(files, 'file')}; " + "; ".join(parts)


NAMES_SHOWN = 3  # messages name this many paths of a kind, then count the rest


def _names(paths: list) -> str:
    """``"a, b, c and 5 more"`` (URLs without their passwords)."""
    shown = ", ".join(shown_url(str(path)) for path in paths[:NAMES_SHOWN])
    return shown + (f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else "")


def counted(number: int, noun: str) -> str:
    """``"1 file"``, ``"8 files"``, ``"1,200 items"``: a count and its noun, singular or plural."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


# Control characters other than newline and tab, as \xNN: a file name from a pile of documents may hold
# terminal escape sequences (a window title, cursor moves that hide a "failed:" line, the clipboard). The
# bidirectional controls as \uNNNN: a right-to-left override shows the rest of a line reversed
# ("invoice\u202egnp.exe" reads "invoiceexe.png").
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)] if code not in (0x09, 0x0A)}
_CONTROL_ESCAPES |= {code: f"\\u{code:04x}" for code in [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
_LINE_ESCAPES = {0x09: "\\x09", 0x0A: "\\x0a", 0x2028: "\\u2028", 0x2029: "\\u2029"}  # (U+2028/9: line breaks to editors)


def terminal_safe(text: str, one_line: bool = False) -> str:
    """``text`` as a message on stderr may show it: control characters written as ``\\xNN``, bidirectional
    controls as ``\\uNNNN``; with ``one_line``, tabs and line breaks too (a line that ``grep`` must find whole,
    a table's cell)."""
    return text.translate(_CONTROL_ESCAPES | _LINE_ESCAPES if one_line else _CONTROL_ESCAPES)


def warn_left_out(paths: list[Path], spec: str) -> None:
    """Say on stderr which image files under ``spec`` were left out because Pillow cannot read them
    (``UNREADABLE_SUFFIXES``: HEIC/HEIF photos, SVG drawings), and what to do: a warning, as for a folder
    that cannot be listed, so that a folder of JPEGs with one SVG logo still runs clean."""
    if paths:
        print(terminal_safe(f"warning: under '{spec}', {_left_out(paths)}; then run again to add them."), file=sys.stderr)


def _left_out(paths: list[Path]) -> str:
    """``"2 HEIC/HEIF files were left out (a.heic, b.heic): Pillow cannot read them, convert them to JPEG or PNG"``."""
    kinds = " and ".join(sorted({UNREADABLE_SUFFIXES[path.suffix.lower()] for path in paths}))
    names = ", ".join(path.name for path in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    were, them = ("file was", "it") if len(paths) == 1 else ("files were", "them")
    return f"{len(paths)} {kinds} {were} left out ({names}): Pillow cannot read {them}, convert {them} to JPEG or PNG"


def warn_unlisted(errors: list[OSError], spec: str) -> None:
    """Say on stderr which sub-folders the walk of pattern ``spec`` could not list.

    A warning, not a failed item: a tree often holds folders of no concern that the user may not
    enter (``lost+found``, another user's), and their failure would fail every run. The warning says
    that their files were not run, so that a folder the user meant is not missed unnoticed.
    """
    for error in errors:
        print(terminal_safe(
            f"warning: could not list the folder '{error.filename}' ({error.strerror}) under '{spec}': its files were "
            "not included. Check that you may read and enter it (ls -ld), then run again to add them."
        ), file=sys.stderr)


def _failed(path: Path, error: ImageLoadError, strict: bool) -> Item:
    """An item for ``path`` that fails with ``error`` when loaded; ``error`` is raised now if ``strict``."""
    if strict:
        raise error
    return Item(str(path), loader=_raiser(error))


def _is_file_or_unreadable(path: Path) -> bool:
    """Whether ``path`` is a file, or may be one that cannot be seen (a link into a folder that may not
    be entered): it is then an item that fails, naming it, when it is read."""
    try:
        status = _stat(path)
    except OSError:
        return True
    return status is not None and stat.S_ISREG(status.st_mode)


def _is_folder(path: Path) -> bool:
    try:
        status = _stat(path)
    except OSError:
        return False
    return status is not None and stat.S_ISDIR(status.st_mode)


def glob_files(pattern: str, unlisted: list | None = None, hidden: list | None = None,
               not_regular: list | None = None, ignore_case: bool = False) -> list[Path]:
    """The files that match a glob ``pattern`` (``*``, ``?``, ``[...]``, ``**`` for any depth), sorted.

    Like ``glob.glob(pattern, recursive=True)`` (names starting with a dot only match a pattern that
    starts with a dot), but the folder walk never follows a symbolic link to a folder, so a symlink
    loop cannot repeat files or make the walk endless; a pattern without ``**`` is searched no deeper
    than it has parts. A name that matches but cannot be seen (a link into a folder that may not be
    entered) is listed: reading it fails, naming it. The folders that cannot be listed are skipped;
    their OSErrors (``.filename`` is the folder) are appended to ``unlisted``, if given. The files that
    would match but for a hidden name (theirs or a folder's on the way) are appended to ``hidden``, if given;
    the matches that are not regular files (FIFOs, devices, broken or looping links) to ``not_regular``.
    ``ignore_case``: names match whatever their case (what a pattern with another case would find).
    """
    root, wanted = _split_pattern(pattern)
    if ignore_case:
        wanted = tuple(part.lower() for part in wanted)
    deepest = None if "**" in wanted else len(wanted) - 1  # folders below root that can match
    matches, onerror = [], (None if unlisted is None else unlisted.append)
    for folder, subfolders, names in os.walk(root, followlinks=False, onerror=onerror):
        relative = Path(folder).relative_to(root).parts
        if deepest is not None and len(relative) >= deepest:
            subfolders.clear()
        for name in names:
            path = Path(folder) / name
            if _glob_match(wanted, tuple(part.lower() for part in (*relative, name)) if ignore_case else (*relative, name)):
                if _is_file_or_unreadable(path):
                    matches.append(path)
                elif not_regular is not None:
                    not_regular.append(path)
            elif hidden is not None and _glob_match(wanted, (*relative, name), hidden=True) and _is_file_or_unreadable(path):
                hidden.append(path)
    for found in (hidden, not_regular):
        if found is not None:
            found.sort()
    return sorted(matches)


def glob_root(pattern: str) -> Path:
    """The folder where the walk of a glob ``pattern`` starts: its parts before the first wildcard ("." if none)."""
    return _split_pattern(pattern)[0]


def _split_pattern(pattern: str) -> tuple[Path, tuple]:
    """A glob pattern as (the folder before its first wildcard, the parts from there on)."""
    parts = _expand(pattern).parts
    first_magic = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:first_magic]), parts[first_magic:]  # Path() is "."


def _glob_match(pattern: tuple, parts: tuple, hidden: bool = False) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts (``**``: zero or more folders). Wildcards do not
    match names that start with ".", unless ``hidden``."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for count in range(len(parts) + 1):  # ** takes parts[:count]
            if count and parts[count - 1].startswith(".") and not hidden:
                return False
            if _glob_match(rest, parts[count:], hidden):
                return True
        return False
    if not parts or (parts[0].startswith(".") and not head.startswith(".") and not hidden):
        return False
    # fnmatch, as glob: case-insensitive where the system's names are (Windows: IMG_0001.JPG matches *.jpg)
    return fnmatch.fnmatch(parts[0], head) and _glob_match(rest, parts[1:], hidden)


def collect_all(specs: list[str], report: bool = True) -> list[Item]:
    """``collect_items`` of several ``--image`` values, in order, each item once: a file named by two
    values (``a.png`` and ``scans/``, the same name twice, two links to it) is listed under its first name.
    A value that cannot be read fails the command only when it is the only one; among several it is
    one failing item (one bad item never stops the others).

    ``report``: say in one line on stderr what folders and patterns left out (files without an image or
    PDF suffix, hidden files, files in hidden folders, more names of a file, a folder's sub-folders:
    ``LeftOut.report``); nothing when nothing was left out.
    """
    left_out, repeats = LeftOut(), []
    items = [item for spec in specs for item in collect_items(spec, strict=len(specs) == 1, left_out=left_out)]
    items = _once(items, key=lambda item: (file_identity(item.source), item.page), repeats=repeats)
    left_out.add(repeats=dict.fromkeys(item.source for item in repeats))  # a document's pages: its name once
    line = left_out.report(items)
    if report and line:
        print(terminal_safe(line), file=sys.stderr)
    return [stamped(item) for item in items]


def _once(things: list, key=lambda path: file_identity(path), repeats: list | None = None) -> list:
    """``things`` (paths, or items with ``key``) without the repeats of a file already listed under
    another name (links); the repeats are appended to ``repeats``, if given."""
    seen, unique = set(), []
    for thing in things:
        identity = key(thing)
        if identity not in seen:
            seen.add(identity)
            unique.append(thing)
        elif repeats is not None:
            repeats.append(thing)
    return unique


def file_identity(source) -> tuple | str:
    """What a file is, whatever its name: its (device, inode); a missing file is its name, and a URL its
    text without a user name and password (``shown_url``: records keep none, and the same image
    fetched with other credentials is the same item)."""
    if is_url(str(source)):
        return shown_url(str(source))
    try:
        status = os.stat(source)
    except OSError:
        return str(source)
    return status.st_dev, status.st_ino


def _items_for_files(files: list[Path], strict: bool) -> list[Item]:
    """Items for image files and the pages of PDFs and TIFFs. A PDF or TIFF whose pages cannot be
    counted raises when it was the only input (``strict``); among many files it becomes one item that
    fails (and is reported) when loaded."""
    items = []
    for path in files:
        try:
            items.extend(_file_items(path))
        except ImageLoadError as error:
            if strict:
                raise
            items.append(Item(str(path), loader=_raiser(error)))
    return items


def _file_items(path: Path) -> list[Item]:
    """The items of one file: a PDF's or TIFF's pages, or the image."""
    if is_pdf(path):
        return pdf_items(path)
    if is_tiff(path):
        return tiff_items(path)
    return [Item(str(path))]


def item_at(source: str, page: int | None = None, path: str | None = None, modified: int | None = None) -> Item:
    """The item that ``collect_all`` made for ``(source, page)`` (and its ``path`` and ``modified``),
    rebuilt from these plain values.

    Lets another process (a Ray replica) read the pixels of an item it was sent as plain values: a
    local file is read from its absolute ``path`` when given, whatever that process's working folder.
    A PDF without a page number is one that could not be opened: loading it raises the same error (a
    TIFF without one is read by ``load_image``, which raises it too, or is a one-page TIFF).
    """
    where = path or source
    if page is not None:
        return Item(source, page, loader=_page_loader(Path(where), page), path=path, modified=modified)
    if not is_url(source) and is_pdf(source):
        return replace(_items_for_files([Path(where)], strict=False)[0], source=source, path=path, modified=modified)
    if not is_url(source) and _is_folder(Path(where)):  # a folder that collect_items could not list
        return Item(source, loader=_raiser(_unlisted_folder_error(Path(where))), path=path, modified=modified)
    return Item(source, path=path, modified=modified)


def _unlisted_folder_error(path: Path) -> ImageLoadError:
    """Why the folder ``path`` cannot be listed (it is an item only when it could not be)."""
    try:
        os.scandir(path).close()
    except OSError as error:
        return unreadable_error(path, error, folder=True)
    return ImageLoadError(f"'{path}' is a folder that could not be listed when the items were collected; run again.")


def pdf_items(path: Path) -> list[Item]:
    """One item per page of the PDF at ``path``; pages are rendered (at ``PDF_SCALE``) only when loaded."""
    count = _pdf_page_count(path)
    return [Item(str(path), page=n, loader=_page_loader(path, n)) for n in range(1, count + 1)]


def tiff_items(path: Path) -> list[Item]:
    """One item per page of a multi-page TIFF (a scanned fax is a document, as a PDF is); a one-page
    TIFF is one item without a page number, as any image. Only the headers are read here (``count_pages``);
    each page is decoded when loaded, with ``load_image``'s checks (``load_page``)."""
    count = count_pages(path)
    if count == 1:
        return [Item(str(path))]
    return [Item(str(path), page=n, loader=_page_loader(path, n)) for n in range(1, count + 1)]


def render_pdf_page(path, page: int, scale: float = PDF_SCALE, data: bytes | None = None):
    """Render page ``page`` (counting from 1) of a PDF as an RGB PIL image with pypdfium2.

    ``path`` names the file (a URI such as ``s3://...`` too, when ``data`` holds its bytes, already read).
    A page whose bitmap would have more pixels than images may have (twice ``PIL.Image.MAX_IMAGE_PIXELS``,
    the decompression-bomb guard of ``load_image``: ``pixel_limit``) is refused before anything is rendered, with a
    message that names the page and its size and says how to make the PDF usable.
    """
    document = _open_pdf(path) if data is None else _open_pdf_bytes(data, path)
    try:
        if not 1 <= page <= len(document):
            raise ImageLoadError(f"'{path}' has no page {page}: it has {len(document)} page(s).")
        pdf_page = document[page - 1]
        width, height = pdf_page.get_size()  # in points (1/72 inch)
        source = (f"page {page} of '{path}' ({width:g} x {height:g} points = {width / 72:.1f} x {height / 72:.1f} "
                  f"inches, rendered at {72 * scale:g} dpi)")
        check_pixel_count(round(width * scale), round(height * scale), source, remedy=PDF_PAGE_TOO_LARGE)
        bitmap = pdf_page.render(scale=scale)
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


def _open_pdf(path) -> pdfium.PdfDocument:
    """Open a PDF that has pages; every failure is an ImageLoadError that names this file and says why.

    PDFium's error code is only set when loading fails, and stays from an earlier failure otherwise, so
    it is read only for a document that did not load; pypdfium2's own ``PdfDocument(path)`` also reads
    it for a document that loaded but has no pages, and then reports a stale or "Success" error.
    """
    try:
        size = os.stat(path).st_size
    except OSError as error:
        if is_missing(error):
            raise ImageLoadError(f"Could not open '{path}': {error.strerror}.") from None
        raise unreadable_error(path, error) from None
    if size == 0:
        raise ImageLoadError(f"The PDF '{path}' is empty (0 bytes). Re-save or re-download it.")
    handle = pdfium_c.FPDF_LoadDocument(os.fsencode(path), None)
    if not handle:
        code = pdfium_c.FPDF_GetLastError()
        message = PDF_LOAD_ERRORS.get(code, "Could not open '{path}' as a PDF (PDFium error {code}). Is the file complete?")
        raise ImageLoadError(message.format(path=path, code=code))
    document = pdfium.PdfDocument(handle)
    if len(document) == 0:
        document.close()
        raise ImageLoadError(f"The PDF '{path}' has no pages.")
    return document


def _open_pdf_bytes(data: bytes, name) -> pdfium.PdfDocument:
    """``_open_pdf`` for the bytes of a PDF read from ``name`` (a URI)."""
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as error:
        raise ImageLoadError(f"Could not open '{name}' as a PDF ({error}). Is the file complete?") from None
    if len(document) == 0:
        document.close()
        raise ImageLoadError(f"The PDF '{name}' has no pages.")
    return document


def _page_loader(path: Path, page: int) -> Callable:
    """How to read page ``page`` of the PDF or TIFF at ``path``."""
    if is_pdf(path):
        return lambda: render_pdf_page(path, page)
    return lambda: load_page(path, page)


def _raiser(error: Exception) -> Callable:
    def load():
        raise error

    return load


def is_supported(path) -> bool:
    """True for a file name (a path or a URI) of an image or a PDF: what folders and patterns list."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or is_pdf(path)


def _suffix_list() -> str:
    return " ".join(sorted(IMAGE_SUFFIXES | {".pdf"}))
