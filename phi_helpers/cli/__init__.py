"""The command line ``phi-helpers`` (``python -m phi_helpers``): the predict and eval commands.

app (arguments, exit codes) -> tasks (task prompts, batched predict) -> inputs (files, folders,
globs, PDFs) and outputs (records, JSON Lines, resume); evaluate is the eval command.
"""

from .app import main

__all__ = ["main"]
