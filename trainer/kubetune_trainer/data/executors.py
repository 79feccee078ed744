"""Where the per-record steps of worker.py run: in this process, or in a pool of Ray actors on the worker pods.

Both executors run the same Worker methods on the same blocks and units and hand the results back in plan
order, so a preparation gives the same output with either (tests/trainer_data/test_data_parallel.py).

The Ray pool: `parallelism` actors of one CPU each, spread over the cluster's nodes (the KubeRay head has
num-cpus 0, so they land on the worker pods). An actor loads the tokenizer once and parses or encodes many
blocks. The parsed examples of a block stay in Ray's object store (owned by the driver) until the unit that
packs them has run; the driver only ever receives each block's per-record facts and each unit's packed rows.
The actors are killed when the preparation ends, so their memory is free before the training workers start.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

from kubetune_trainer.data.blocks import Block
from kubetune_trainer.data.records import Example
from kubetune_trainer.data.worker import BlockFacts, Settings, UnitRows, Worker

log = logging.getLogger(__name__)

# A unit: the kept examples to pack together, as (block index, kept number) in the global order.
Unit = list[tuple[int, int]]


class InlineExecutor:
    """The steps in this process, one after the other. A parsed block's examples wait on local disk (pickled)
    until their unit is packed, so memory holds about one block of examples, not the dataset."""

    def __init__(self, settings: Settings, tokenizer: Any, client: Any, directory: str):
        self.worker = Worker(settings, tokenizer, client)
        self.directory = directory
        self._loaded: dict[int, list[Example]] = {}
        # A mixture alternates between its sources: one block of each stays loaded.
        self.keep_blocks = max(1, len(settings.source_rules))

    def _path(self, block: int) -> str:
        return os.path.join(self.directory, f"block-{block}.pickle")

    def parse(self, blocks: list[Block]) -> list[BlockFacts]:
        facts = []
        for b in blocks:
            f, examples = self.worker.parse_block(b)
            with open(self._path(b.index), "wb") as out:
                pickle.dump(examples, out, protocol=pickle.HIGHEST_PROTOCOL)
            facts.append(f)
        return facts

    def _examples(self, unit: Unit) -> Iterator[Example]:
        for b, k in unit:
            if b not in self._loaded:
                if len(self._loaded) >= self.keep_blocks:
                    self._loaded.pop(next(iter(self._loaded)))
                with open(self._path(b), "rb") as f:
                    self._loaded[b] = pickle.load(f)
            yield self._loaded[b][k]

    def encode(self, units: Iterable[Unit], spill: Any) -> Iterator[UnitRows]:
        for unit in units:
            yield self.worker.encode_unit(self._examples(unit), spill)  # rows go straight to the spill

    def close(self) -> None:
        self._loaded.clear()


class PrepareActor:
    """A Ray actor's Worker (Ray wraps this class with ray.remote at run time)."""

    def __init__(self, settings: Settings, tokenizer: Any):
        self.worker = Worker(settings, tokenizer)

    def parse(self, block: Block) -> tuple[BlockFacts, list[Example]]:
        return self.worker.parse_block(block)

    def encode(self, picks: list[tuple[int, int]], *example_lists: list[Example]) -> UnitRows:
        return self.worker.encode_unit([example_lists[p][k] for p, k in picks])


class RayExecutor:
    """The steps in `parallelism` Ray actors; results come back in plan order."""

    def __init__(self, settings: Settings, tokenizer: Any, parallelism: int):
        import ray

        self.ray = ray
        actor: Any = ray.remote(PrepareActor)
        actor = actor.options(num_cpus=1, scheduling_strategy="SPREAD", max_restarts=2, max_task_retries=2)
        self.tokenizer_ref = ray.put(tokenizer)  # held while the actors live: a restarted actor needs it again
        self.actors: list[Any] = [actor.remote(settings, self.tokenizer_ref) for _ in range(parallelism)]
        self.refs: dict[int, Any] = {}
        log.info("preparing the data in %d Ray actors", parallelism)

    def parse(self, blocks: list[Block]) -> list[BlockFacts]:
        fact_refs = []
        for i, b in enumerate(blocks):
            facts_ref, examples_ref = self.actors[i % len(self.actors)].parse.options(num_returns=2).remote(b)
            fact_refs.append(facts_ref)
            self.refs[b.index] = examples_ref
        return list(self.ray.get(fact_refs))

    def encode(self, units: Iterable[Unit], spill: Any = None) -> Iterator[UnitRows]:
        # A bounded window of units in flight: the packed rows reach the driver in order, and no more than a
        # few units' rows wait in the object store at a time.
        window = 2 * len(self.actors)
        pending: list[Any] = []
        for i, unit in enumerate(units):
            pending.append(self._submit(i, unit))
            if len(pending) >= window:
                yield self.ray.get(pending.pop(0))
        while pending:
            yield self.ray.get(pending.pop(0))

    def _submit(self, i: int, unit: Unit) -> Any:
        blocks = sorted({b for b, _ in unit})
        position = {b: p for p, b in enumerate(blocks)}
        picks = [(position[b], k) for b, k in unit]
        return self.actors[i % len(self.actors)].encode.remote(picks, *[self.refs[b] for b in blocks])

    def close(self) -> None:
        self.refs.clear()
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
