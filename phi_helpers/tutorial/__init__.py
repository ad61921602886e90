"""Extras for the tutorial notebooks: MRZ checks (mrz), attention timing (profiling), a chat box (widgets)."""
