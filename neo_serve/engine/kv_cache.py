"""The KV cache: a fixed arena of token slots, handed out as contiguous extents of blocks.

The scheduler owns the bookkeeping (`ExtentAllocator`); each stage owns the tensors for its
layers (`KVArena`), all with the same slot numbering. A sequence's keys are one contiguous
extent, so attention reads them as a view, with no gather. When a sequence outgrows its
extent the allocator first tries to extend it in place, then to move it (a copy the stages
apply before the next forward); when neither fits, the scheduler preempts a sequence.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class Extent:
    """Blocks [start, start + length) of the arena."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class KVCopy:
    """Move `num_slots` slots from `src` to `dst` (slot indices), in every layer of every stage."""

    src: int
    dst: int
    num_slots: int


class ExtentAllocator:
    """First-fit allocator of contiguous block runs with coalescing free list."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs positive blocks and block size, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_starts: list[int] = [0]  # sorted starts of free runs
        self._free_len: dict[int, int] = {0: num_blocks}

    @property
    def num_free_blocks(self) -> int:
        return sum(self._free_len.values())

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, length: int) -> Extent | None:
        for start in self._free_starts:
            run = self._free_len[start]
            if run >= length:
                self._take(start, length)
                return Extent(start, length)
        return None

    def free_runs(self) -> dict[int, int]:
        """The free runs, start -> length in blocks (a copy)."""
        return dict(self._free_len)

    def copy(self) -> "ExtentAllocator":
        """A scratch allocator in the same state, to try frees and allocations on."""
        scratch = ExtentAllocator(self.num_blocks, self.block_size)
        scratch._free_starts, scratch._free_len = list(self._free_starts), dict(self._free_len)
        return scratch

    def try_extend(self, extent: Extent, extra: int) -> bool:
        """Grow `extent` in place by `extra` blocks if the blocks right after it are free."""
        run = self._free_len.get(extent.end)
        if run is None or run < extra:
            return False
        self._take(extent.end, extra)
        extent.length += extra
        return True

    def free(self, extent: Extent) -> None:
        start, length = extent.start, extent.length
        index = bisect.bisect_left(self._free_starts, start)
        # Coalesce with the following free run.
        if index < len(self._free_starts) and self._free_starts[index] == start + length:
            length += self._free_len.pop(self._free_starts.pop(index))
        # Coalesce with the preceding free run.
        if index > 0:
            prev = self._free_starts[index - 1]
            if prev + self._free_len[prev] == start:
                self._free_len[prev] += length
                return
        self._free_starts.insert(index, start)
        self._free_len[start] = length

    def _take(self, start: int, length: int) -> None:
        run = self._free_len.pop(start)
        index = bisect.bisect_left(self._free_starts, start)
        self._free_starts.pop(index)
        if run > length:
            rest = start + length
            self._free_starts.insert(index, rest)
            self._free_len[rest] = run - length


class KVArena:
    """One stage's KV tensors: [stage layers, 2 (k|v), slots, heads, head_dim] (token-major) or
    [stage layers, 2, heads, slots, head_dim] (head-major), as the attention backend wants."""

    def __init__(self, num_layers: int, num_slots: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *, token_major: bool) -> None:
        shape = (num_slots, num_heads) if token_major else (num_heads, num_slots)
        self.tensor = torch.zeros(num_layers, 2, *shape, head_dim, dtype=dtype, device=device)
        self.slot_dim = 2 if token_major else 3

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def apply_copies(self, copies: tuple[KVCopy, ...]) -> None:
        """Apply a step's extent moves, in order (a later move may reuse a freed source)."""
        for copy in copies:
            source = self.tensor.narrow(self.slot_dim, copy.src, copy.num_slots)
            if abs(copy.dst - copy.src) < copy.num_slots:
                # Overlapping ranges read what they overwrite: go through a copy. The scheduler's
                # moves never overlap (the new extent is allocated while the old is held), so
                # they copy once, which on CPU halves the memory traffic of a move.
                source = source.clone()
            self.tensor.narrow(self.slot_dim, copy.dst, copy.num_slots).copy_(source)
