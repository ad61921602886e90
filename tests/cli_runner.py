"""Run the command line in this process for tests, and make the folders of scans it runs on."""

from pathlib import Path

from PIL import Image

from phi_helpers.cli import app as cli


def run(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr). Usage errors come back as code 2."""
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def scans(tmp_path: Path, count: int, step: int) -> Path:
    """A folder ``scans`` of ``count`` small PNG pages, each a shade of red ``step`` apart (unlike files)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (40, 30), (step * index, 0, 0)).save(folder / f"page_{index}.png")
    return folder
