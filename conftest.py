"""pytest set-up shared by tests/ and the notebooks run by nbval.

Everything runs offline on a tiny random checkpoint: PHI_HELPERS_MODEL=tiny makes load_model() build
one (once, cached) instead of downloading the real weights. The notebook kernels inherit these
variables. Set PHI_HELPERS_MODEL yourself to run the notebooks against a real model.
"""

import os
from pathlib import Path

os.environ.setdefault("PHI_HELPERS_MODEL", "tiny")
os.environ.setdefault("PHI_HELPERS_CACHE", str(Path(__file__).parent / ".cache" / "phi_helpers"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
