"""Nothing leaves the machine that the user did not ask for: loading a local folder, asking, extracting
and the command line's in-process engine open no network connection and look up no host name, with
the hub's offline switch unset (the Ray engine is another matter: docs/scaling.md says what Ray sends)."""

import json
import socket

import pytest
from PIL import Image

from cli_runner import run
from phi_helpers import ask, environment_report, extract, load_model

SCHEMA = {"type": "object", "properties": {"total": {"type": "number", "minimum": 0, "maximum": 100}}, "required": ["total"]}


@pytest.fixture
def network_attempts(monkeypatch):
    """Every attempt to reach another machine (an internet socket's connect, a host name lookup), refused."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(("connect", address))
            raise OSError("network blocked by the test")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror("network blocked by the test")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PHI_HELPERS_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_a_local_model_asks_and_extracts_without_the_network(network_attempts, tiny_checkpoint, tmp_path):
    model, processor = load_model(str(tiny_checkpoint), num_crops=1)
    image = Image.new("RGB", (120, 80), "white")
    ask(model, processor, "What is this?", images=[image], max_new_tokens=4)
    extract(model, processor, "What is the total?", SCHEMA, images=[image], max_new_tokens=16)
    environment_report()
    assert network_attempts == []


def test_the_command_line_runs_without_the_network(capsys, network_attempts, tiny_checkpoint, tmp_path):
    Image.new("RGB", (120, 80), "white").save(tmp_path / "scan.png")
    (tmp_path / "total.schema.json").write_text(json.dumps(SCHEMA))
    code, _, err = run(capsys, "predict", "--model", tiny_checkpoint, "--image", tmp_path / "scan.png", "--task", "extract",
                       "--schema", tmp_path / "total.schema.json", "--max-new-tokens", "16", "--num-crops", "1",
                       "--output", tmp_path / "out.jsonl")
    assert code == 0, err
    assert network_attempts == []
