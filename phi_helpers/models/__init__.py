"""Hugging Face model implementations carried by phi_helpers (one folder per model type)."""
