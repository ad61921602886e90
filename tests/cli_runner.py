"""Run the command line in this process for tests: shared by test_cli.py and test_evaluation.py."""

from phi_helpers.cli import app as cli


def run(capsys, *argv) -> tuple[int, str, str]:
    """cli.main in this process: (exit code, stdout, stderr). Usage errors come back as code 2."""
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
