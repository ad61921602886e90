"""The versions phi_helpers is tested with: the ones the lock (requirements.txt) pins.

README.md ("Tested versions") states the same versions; tests/test_versions.py checks that this
constant, the README and the lock agree. ``environment_report()`` warns when Python (major.minor),
the installed torch or transformers differs. After ``./run.sh lock`` moves a version, update it here and in the README.
"""

TESTED_VERSIONS = {"python": "3.11", "torch": "2.13.0", "transformers": "5.24.0"}

__all__ = ["TESTED_VERSIONS"]
