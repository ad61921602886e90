"""A KV cache that does not copy itself at every decoding step.

transformers' ``DynamicCache`` appends each new token's keys and values with ``torch.cat``, which copies
the whole cache of every layer at every step. With 8 rows of 800-token prompts that copy costs more than
the attention that reads the cache (benchmarks/bench_native.py, "batch"). ``PreallocatedCache`` writes
into buffers sized for prompt + answer and gives the attention a view of their filled part: the same
keys and values, the same answers, no per-step copy.

    cache = PreallocatedCache(model.config, capacity=prompt_tokens + max_new_tokens)
    model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens)

The whole prompt + ``max_new_tokens`` is allocated at the first step, which is the KV cache figure of
``memory_estimate`` (a ``DynamicCache`` reaches it only if the answer runs to ``max_new_tokens``).

``ask``, ``stream_chunks`` and ``generate_batch`` use it (``generate_batch`` fills it with its prompts one
row at a time, ``write_rows``). Everything else is ``DynamicCache``'s: a layer
that outgrows its buffer gets a larger one (twice the size), and after an operation that replaces the
keys and values (``batch_select_indices``, ``reorder_cache`` for beam search) the next step copies them
into a new buffer once.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` are views ``buffer[:, :, :length]`` of buffers of
    shape (batch, kv_heads, capacity, head_dim), filled in place."""

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
            capacity = max(self.capacity, end, 2 * length)
            self.key_buffer = self._new_buffer(self.keys, key_states, length, capacity)
            self.value_buffer = self._new_buffer(self.values, value_states, length, capacity)
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
            shape = (batch, heads, max(self.capacity, end), head_dim)
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

    @staticmethod
    def _new_buffer(cached: torch.Tensor, states: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        batch, heads, _, head_dim = states.shape
        buffer = states.new_empty(batch, heads, capacity, head_dim)
        if length:
            buffer[:, :, :length].copy_(cached)
        return buffer


class PreallocatedCache(DynamicCache):
    """``DynamicCache(config=...)`` with ``PreallocatedLayer`` layers of ``capacity`` tokens."""

    def __init__(self, config, capacity: int):
        super().__init__(config=config)
        self.layers = [PreallocatedLayer(capacity) for _ in self.layers]

    def write_rows(self, first_row: int, batch: int, start: int, part: DynamicCache) -> None:
        """Copy ``part``, the cache of rows ``first_row``, ``first_row + 1``, ... of a batch of ``batch``
        prompts from position ``start`` on, into this cache, which is filled that way group by group (all
        groups end at the same position; zeros before ``start``)."""
        for layer, source in zip(self.layers, part.layers):
            layer.write_rows(first_row, batch, start, source.keys, source.values)


__all__ = ["PreallocatedCache", "PreallocatedLayer"]
