"""The versions phi_helpers is tested with: the ones the lock (requirements.txt) pins.

README.md ("Tested versions") states the same versions; tests/test_versions.py checks that this
constant, the README and the lock agree. ``environment_report()`` warns when Python (major.minor),
the installed torch or transformers differs. After ``./run.sh lock`` moves a version, update it here and in the README.
"""

import importlib.metadata

TESTED_VERSIONS = {"python": "3.11", "torch": "2.13.0", "transformers": "5.24.0"}


def package_version() -> str:
    """This package's installed version (pyproject.toml's), or a note when it is imported from a source
    folder that was never installed."""
    try:
        return importlib.metadata.version("phi_helpers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed (imported from the source folder)"


__all__ = ["TESTED_VERSIONS", "package_version"]
