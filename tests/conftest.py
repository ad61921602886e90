"""Shared fixtures: a tiny random checkpoint (built once per test session) and the model loaded from it."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from phi_helpers import load_model
from phi_helpers.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Phi-3.5-vision checkpoint in the official layout (about 30 MB, a few seconds)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-phi-3.5-vision"), variant="phi-3.5-vision")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_checkpoint):
    """``load_model`` on the tiny checkpoint, on CPU; shared by all tests (do not modify it in place)."""
    saved = os.environ.pop("PHI_HELPERS_MODEL", None)  # it would override the path
    try:
        return load_model(str(tiny_checkpoint), device="cpu")
    finally:
        if saved is not None:
            os.environ["PHI_HELPERS_MODEL"] = saved


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny model in fp32 through the Auto class, fresh for each test module."""
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    """The tiny checkpoint's processor through the Auto class, fresh for each test module."""
    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def cli_model_and_processor(tiny_checkpoint):
    """The tiny model in fp32 with a num_crops=1 processor (fewer image tokens: fast CLI tests)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_checkpoint, num_crops=1)


@pytest.fixture
def tiny_model(monkeypatch, tiny_checkpoint, cli_model_and_processor):
    """The command line's load_model returns the cached tiny model (never the hub, whatever happens);
    ``.calls`` counts how often it was asked for. The CLI test modules use it for every test."""
    monkeypatch.setenv("PHI_HELPERS_MODEL", str(tiny_checkpoint))

    class Loader:
        calls = 0

        def __call__(self, *args, **kwargs):
            Loader.calls += 1
            return cli_model_and_processor

    loader = Loader()
    monkeypatch.setattr("phi_helpers.cli.tasks.load_model", loader)
    return loader
