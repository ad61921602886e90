"""Streaming passes each token's text on as soon as it is decoded for good, constrained JSON (which has no
spaces) included, and the pieces join to exactly the answer of ``ask`` without streaming.

Before: transformers' streamer held text back until the next space, so a constrained answer came in one
piece at the end, and ``ask(..., schema=..., stream=True)`` printed it all at once."""

import random

import pytest
import torch

from phi_helpers import ask
from phi_helpers.api import generation
from phi_helpers.api.generation import _AnswerStreamer, _decode_answer, stream_chunks

NUMBERS = {  # its answers have no spaces: {"a":[529,298]}
    "type": "object",
    "properties": {"a": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "maxItems": 30}},
    "required": ["a"],
}
STOP_IDS = [32007, 32000]  # <|end|>, <|endoftext|>


@pytest.fixture
def model_and_processor(tiny_model_and_processor):
    return tiny_model_and_processor


def test_a_constrained_answer_streams_in_pieces_that_join_to_the_plain_answer(model_and_processor):
    model, processor = model_and_processor
    plain = ask(model, processor, "Numbers?", schema=NUMBERS, max_new_tokens=60)
    assert " " not in plain and plain.startswith('{"a":[')  # the tiny model's constrained answer
    pieces = list(stream_chunks(model, processor, "Numbers?", schema=NUMBERS, max_new_tokens=60))
    assert len(pieces) > 1  # before: one piece, when generation ended
    assert "".join(pieces) == plain


def test_ask_prints_a_constrained_answer_as_it_comes(monkeypatch, model_and_processor):
    model, processor = model_and_processor
    plain = ask(model, processor, "Numbers?", schema=NUMBERS, max_new_tokens=60)
    shown = []
    monkeypatch.setattr(generation, "_show", shown.append)
    assert ask(model, processor, "Numbers?", schema=NUMBERS, max_new_tokens=60, stream=True) == plain
    assert shown[-1] == "\n" and len(shown[:-1]) > 1 and "".join(shown[:-1]) == plain  # before: ['{"a":[...]}', '\n']


@pytest.mark.parametrize("question", ["Describe.", "Tell a story.", "List three things."])
def test_an_unconstrained_stream_joins_to_the_plain_answer(model_and_processor, question):
    model, processor = model_and_processor
    plain = ask(model, processor, question, max_new_tokens=80)
    pieces = list(stream_chunks(model, processor, question, max_new_tokens=80))
    assert len(pieces) > 1 and "".join(pieces).strip() == plain


def stream(tokenizer, tokens: list[int]) -> list[str]:
    """The pieces an _AnswerStreamer passes on when generate hands it a prompt and then ``tokens``, one by one."""
    streamer = _AnswerStreamer(tokenizer, STOP_IDS)
    streamer.put(torch.tensor([[1, 32010, 100]]))  # the prompt
    for token in tokens:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return [piece for piece in streamer if piece]


def test_pieces_join_to_the_decoded_answer_whatever_the_tokens(processor):
    """Random answers of words, spaces, newlines, special tokens and characters spelled as byte tokens
    (a run of them is one piece of UTF-8 for the decoder: one wrong byte turns the whole run into '\\ufffd')."""
    tokenizer = processor.tokenizer
    byte = {value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>") for value in range(256)}
    spelled = [[byte[value] for value in char.encode()] for char in ("€", "😀", "é", "\n", "{")]
    words = tokenizer.encode('The total: {"a":[12, 3]} ▁ x', add_special_tokens=False)
    rng = random.Random(0)
    for _ in range(300):
        tokens = []
        for _ in range(rng.randrange(1, 25)):
            kind = rng.randrange(6)
            if kind == 0:
                tokens += rng.choice(spelled)
            elif kind == 1:
                tokens.append(byte[rng.randrange(128, 256)])  # a lone byte: never a whole character
            elif kind == 2:
                tokens.append(rng.choice([2, 29871, 32001, 32044]))  # </s>, ▁, <|assistant|>, <|image|>
            else:
                tokens.append(rng.choice([*words, rng.randrange(259, 32000)]))
        pieces = stream(tokenizer, tokens)
        assert "".join(pieces).strip() == _decode_answer(processor, tokens, STOP_IDS), tokens


def test_only_an_unfinished_run_of_byte_tokens_waits(processor):
    tokenizer = processor.tokenizer
    euro = [tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>") for value in "€".encode()]
    tokens = tokenizer.encode('{"a":', add_special_tokens=False) + euro + tokenizer.convert_tokens_to_ids(["1", "}"])
    pieces = stream(tokenizer, tokens)
    assert "".join(pieces) == '{"a":€1}'
    assert pieces[-2:] == ["€1", "}"]  # the euro's three bytes come out with the next token, as one character
