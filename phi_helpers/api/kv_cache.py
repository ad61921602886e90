"""A KV cache that does not copy itself at every decoding step.

transformers' ``DynamicCache`` appends each new token's keys and values with ``torch.cat``, which copies
the whole cache of every layer at every step. With 8 rows of 800-token prompts that copy costs more than
the attention that reads the cache (benchmarks/bench_native.py, "batch"). ``PreallocatedCache`` writes
into buffers with room for more tokens and gives the attention a view of their filled part: the same
keys and values, the same answers, no per-step copy.

    cache = PreallocatedCache(model.config, capacity=prompt_tokens + max_new_tokens)
    model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens)

``capacity`` is the most the cache is expected to hold, not what it takes at once: the buffers start
with room for the prompt and ``GROWTH`` (256) answer tokens, and a full buffer is replaced by one twice as
long (at most ``capacity``), the cache so far copied over once. So a short answer costs little whatever
``max_new_tokens`` is (the real model in bf16 takes 0.375 MiB per token: ``max_new_tokens=32768`` reserved
12 GiB up front when the buffers were sized for all of it), and a long answer is copied about
log2(answer / 256) times instead of at every step. The most it holds is ``capacity`` tokens, the KV cache
figure of ``memory_estimate``; while a buffer is replaced, the old one is alive too.

``ask``, ``stream_chunks`` and ``generate_batch`` use it (``generate_batch`` fills it with its prompts one
row at a time, ``write_rows``; its rows grow together). Everything else is ``DynamicCache``'s: after an
operation that replaces the keys and values (``batch_select_indices``, ``reorder_cache`` for beam search)
the next step copies them into a new buffer of the same length once; past ``capacity`` a layer still
grows, by doubling.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROWTH = 256  # room for this many answer tokens at first, and at least this many more when a buffer is full


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` are views ``buffer[:, :, :length]`` of buffers of
    shape (batch, kv_heads, room, head_dim), filled in place; ``room`` grows towards ``capacity``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._fits(key_states, length, end):
            room = self._room(length, end)
            self.key_buffer = self._new_buffer(self.keys, key_states, length, room)
            self.value_buffer = self._new_buffer(self.values, value_states, length, room)
        self.key_buffer[:, :, length:end].copy_(key_states)
        self.value_buffer[:, :, length:end].copy_(value_states)
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def write_rows(self, first_row: int, batch: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the keys and values (rows, kv_heads, length, head_dim) of rows ``first_row``, ... of a
        batch of ``batch`` rows at positions ``start``, ..., ``start + length - 1``, with zeros before
        ``start`` (left padding that was not encoded: masked, and finite, as attention needs it); the
        rows not written yet hold garbage until they are."""
        rows, end = slice(first_row, first_row + key_states.shape[0]), start + key_states.shape[2]
        if self.key_buffer is None:
            self.lazy_initialization(key_states, value_states)
            _, heads, _, head_dim = key_states.shape
            shape = (batch, heads, self._room(0, end), head_dim)
            self.key_buffer, self.value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
        for buffer, states in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
            buffer[rows, :, :start].zero_()
            buffer[rows, :, start:end].copy_(states)
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    def _fits(self, key_states: torch.Tensor, length: int, end: int) -> bool:
        """Do the buffers hold the cache so far (``keys`` is still their view) with room up to ``end``?"""
        buffer = self.key_buffer
        if buffer is None or end > buffer.shape[2] or buffer.dtype != key_states.dtype or buffer.device != key_states.device:
            return False
        if buffer.shape[:2] != key_states.shape[:2] or buffer.shape[3] != key_states.shape[3]:
            return False
        return length == 0 or (self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[0] == buffer.shape[0])

    def _room(self, length: int, end: int) -> int:
        """The length of new buffers for a cache of ``length`` tokens that must hold ``end``: the old
        buffers' length if that is enough (rows left the batch, beams were reordered), else twice the cache
        so far and at least ``GROWTH`` more tokens, but no more than ``capacity`` while ``end`` fits in it."""
        room = 0 if self.key_buffer is None else self.key_buffer.shape[2]
        if end > room:
            room = max(2 * length, end + GROWTH)
            if end <= self.capacity:
                room = min(room, self.capacity)
        return room

    @staticmethod
    def _new_buffer(cached: torch.Tensor, states: torch.Tensor, length: int, room: int) -> torch.Tensor:
        batch, heads, _, head_dim = states.shape
        buffer = states.new_empty(batch, heads, room, head_dim)
        if length:
            buffer[:, :, :length].copy_(cached)
        return buffer


class PreallocatedCache(DynamicCache):
    """``DynamicCache(config=...)`` with ``PreallocatedLayer`` layers that grow towards ``capacity`` tokens."""

    def __init__(self, config, capacity: int):
        super().__init__(config=config)
        self.layers = [PreallocatedLayer(capacity) for _ in self.layers]

    def write_rows(self, first_row: int, batch: int, start: int, part: DynamicCache) -> None:
        """Copy ``part``, the cache of rows ``first_row``, ``first_row + 1``, ... of a batch of ``batch``
        prompts from position ``start`` on, into this cache, which is filled that way group by group (all
        groups end at the same position; zeros before ``start``)."""
        for layer, source in zip(self.layers, part.layers):
            layer.write_rows(first_row, batch, start, source.keys, source.values)


__all__ = ["GROWTH", "PreallocatedCache", "PreallocatedLayer"]
