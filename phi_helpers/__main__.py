"""``python -m phi_helpers ...`` runs the command line (see ``phi_helpers.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
