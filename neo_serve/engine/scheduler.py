"""Continuous batching with KV admission control and preemption by recompute.

Every step: running sequences first (each decode takes one token, an unfinished prefill takes
a chunk), then waiting ones in arrival order while the token budget, the sequence limit and the
KV cache allow. A running sequence that outgrows its extent is extended or moved; if no free
run allows either, the most recently arrived running sequences whose blocks make one are
preempted (or, if none would, the sequence itself): their KV is freed and they wait to be
recomputed from their tokens (prompt + what they generated), losing nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from neo_serve.engine.kv_cache import ExtentAllocator, KVCopy
from neo_serve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 1024  # tokens per step (decodes + prefill chunks)
    lookahead_tokens: int = 16  # KV slots reserved beyond a sequence's current length
    growth_fraction: float = 0.25  # an outgrown extent grows by this much of its length

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed when scheduled)
    length: int  # tokens computed this step

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.end == self.seq.total_len


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    kv_copies: list[KVCopy] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: ExtentAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its KV."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def schedule(self, in_flight: Mapping[Sequence, int] | None = None, max_seqs: int | None = None,
                 prefill_split: int = 1) -> ScheduledBatch:
        """Pick this step's work.

        in_flight: sequences with a chunk in a micro-batch still on its way through the pipeline's
        stages, each with where its last such chunk ends. They are never preempted. One whose
        chunk reaches its last token waits for the token sampled there; one still prefilling
        takes its next chunk from that end: every stage runs its micro-batches in the order they
        were sent, so the earlier chunk's KV is written before this one reads it.
        max_seqs: at most this many sequences in the batch besides those continuing a prefill in
        flight, which count in the micro-batch that holds their first chunk (to split the running
        set into micro-batches that keep every pipeline stage busy).
        prefill_split: a prefill takes at most 1 / prefill_split of what it has left per chunk
        (one chunk per micro-batch in flight): a prompt then weighs on each micro-batch alike,
        where whole it made one micro-batch several times longer than the next, and the stage
        that finished the short one waited for the long one to come round.
        """
        in_flight = in_flight if in_flight is not None else {}
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        seq_budget = max_seqs if max_seqs is not None else self.config.max_num_seqs
        scheduled: set[Sequence] = set()
        counted = 0  # sequences against seq_budget
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or (counted >= seq_budget and seq not in in_flight):
                continue
            start = in_flight.get(seq, seq.num_computed)
            length = min(seq.total_len - start, budget, self._prefill_share(seq, prefill_split))
            if seq in in_flight:
                # Only within its extent: moving it would copy KV that in-flight chunks still write.
                length = min(length, seq.extent.length * self.allocator.block_size - start)
            if length <= 0:
                continue
            if seq not in in_flight and not self._reserve(seq, start + length, batch, scheduled | in_flight.keys()):
                continue  # seq itself was preempted
            batch.chunks.append(ScheduledChunk(seq, start, length))
            scheduled.add(seq)
            counted += seq not in in_flight
            budget -= length
        if batch.preempted and (batch.chunks or in_flight):
            return batch  # the cache is full: admit nobody new this step
        # Otherwise the preempted sequences were all there was (one that evicted itself for want
        # of a contiguous extent leaves the cache empty): admit them again now, since a caller
        # that sees an empty batch with nothing in flight has no reason to schedule again.
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and counted < seq_budget):
            seq = self.waiting[0]
            extent = self.allocator.allocate(self._admission_blocks(seq))
            if extent is None:
                break
            self.waiting.popleft()
            seq.extent, seq.num_computed, seq.status = extent, 0, SequenceStatus.RUNNING
            self.running.append(seq)
            length = min(seq.total_len, budget, self._prefill_share(seq, prefill_split))
            batch.chunks.append(ScheduledChunk(seq, 0, length))
            counted += 1
            scheduled.add(seq)
            budget -= length
        return batch

    @staticmethod
    def _prefill_share(seq: Sequence, prefill_split: int) -> int:
        """The most tokens one chunk of seq's prefill takes: its share of what is left to
        compute (measured from what is in the cache, so the chunks of one prefill in flight
        together are of one size). A decode (one token left) is never cut."""
        return -(-(seq.total_len - seq.num_computed) // prefill_split)

    def num_schedulable(self) -> int:
        """How many sequences the coming steps can run: the running ones and the waiting ones the
        KV cache admits now, in arrival order (admission stops at the first that does not fit),
        up to max_num_seqs. What a pipeline splits over its micro-batches: counting waiting
        sequences that cannot be admitted gave the first micro-batch every running one."""
        count = min(len(self.running), self.config.max_num_seqs)
        scratch: ExtentAllocator | None = None
        for seq in self.waiting:
            if count >= self.config.max_num_seqs:
                break
            scratch = scratch or self.allocator.copy()
            if scratch.allocate(self._admission_blocks(seq)) is None:
                break
            count += 1
        return count

    def _admission_blocks(self, seq: Sequence) -> int:
        """The extent a waiting sequence gets: its tokens and the lookahead, within its longest."""
        return self.allocator.blocks_for(min(seq.total_len + self.config.lookahead_tokens, self._max_len(seq)))

    def _max_len(self, seq: Sequence) -> int:
        return len(seq.prompt_ids) + seq.request.max_tokens

    def _reserve(self, seq: Sequence, needed_tokens: int, batch: ScheduledBatch,
                 protected: set[Sequence] | frozenset[Sequence]) -> bool:
        """Make seq's extent hold `needed_tokens`, preempting later arrivals if the cache is full.

        `protected`: sequences already in this batch or in flight, which are never preempted."""
        allocator = self.allocator
        while seq.extent.length * allocator.block_size < needed_tokens:
            need = allocator.blocks_for(needed_tokens) - seq.extent.length
            grow = max(need, int(seq.extent.length * self.config.growth_fraction),
                       allocator.blocks_for(self.config.lookahead_tokens))
            grow = max(need, min(grow, allocator.blocks_for(self._max_len(seq)) - seq.extent.length))
            if allocator.try_extend(seq.extent, grow) or allocator.try_extend(seq.extent, need):
                return True
            # A move to a free run that holds the growth, else just the need, before preempting anyone.
            moved = allocator.allocate(seq.extent.length + grow) or allocator.allocate(seq.extent.length + need)
            if moved is not None:
                batch.kv_copies.append(KVCopy(seq.extent.start * allocator.block_size,
                                              moved.start * allocator.block_size, seq.num_computed))
                allocator.free(seq.extent)
                seq.extent = moved
                return True
            # Extents are contiguous: a later arrival's blocks help only if, freed, they join a run
            # that seq can grow into or move to. Preempt just the later arrivals that make one, or
            # else seq itself, rather than each in turn for nothing.
            victims = self._victims_making_room(seq, need, protected)
            for victim in victims or [seq]:
                self._preempt(victim, batch)
            if not victims:
                return False
        return True

    def _victims_making_room(self, seq: Sequence, need: int,
                             protected: set[Sequence] | frozenset[Sequence]) -> list[Sequence] | None:
        """Later arrivals (never `protected` ones) whose freed blocks let seq grow by `need` blocks
        in place or move to a free run, or None if no set of them does. Going back from the
        latest arrival until their blocks and the free ones make such a run; of those, only the
        ones inside it, less any it can do without (earlier arrivals are spared first)."""
        scratch = self.allocator.copy()  # the allocator's own frees, coalescing as they would
        candidates: list[Sequence] = []
        for candidate in reversed(self.running):
            if candidate is seq:
                return None
            if candidate in protected or candidate.extent is None:
                continue
            candidates.append(candidate)
            scratch.free(candidate.extent)
            room = self._room_for(seq, need, scratch.free_runs())
            if room is not None:
                start, length = room
                victims = [v for v in candidates if start <= v.extent.start < start + length]
                for spared in reversed(list(victims)):
                    rest = [v for v in victims if v is not spared]
                    if self._room_for(seq, need, self._free_runs_after(rest)) is not None:
                        victims = rest
                return victims
        return None

    def _free_runs_after(self, victims: list[Sequence]) -> dict[int, int]:
        scratch = self.allocator.copy()
        for victim in victims:
            scratch.free(victim.extent)
        return scratch.free_runs()

    @staticmethod
    def _room_for(seq: Sequence, need: int, runs: dict[int, int]) -> tuple[int, int] | None:
        """The free run (start, length) that lets seq grow by `need` blocks in place, else one it
        can move to, else None."""
        if runs.get(seq.extent.end, 0) >= need:
            return seq.extent.end, runs[seq.extent.end]
        return next(((s, n) for s, n in sorted(runs.items()) if n >= seq.extent.length + need), None)

    def preempt_all(self) -> int:
        """Free every running sequence's KV and queue it for recompute (a stage lost its cache).

        Nothing is lost: each sequence keeps its tokens and is prefilled again from them."""
        victims = list(self.running)
        batch = ScheduledBatch()
        for seq in reversed(victims):  # latest first, so the earliest ends up first in line
            self._preempt(seq, batch, for_space=False)
        return len(victims)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch, *, for_space: bool = True) -> None:
        """Free seq's KV and queue it for recompute. `for_space`: the cache was full, which is
        what the preemption counts (a stage restart's recompute is not one)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        # Keep arrival order among the waiting: preempted sequences arrived before any waiting one.
        self.waiting.appendleft(seq)
        if for_space:
            seq.request.metrics.num_preemptions += 1
            self.num_preemptions += 1
        batch.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.extent is not None:
            self.allocator.free(seq.extent)
            seq.extent = None
        seq.num_computed = 0
