"""Where the per-record steps of worker.py run, and where the packed rows are kept and cut into shards: in this
process, or in a pool of Ray actors on the worker pods.

Both executors run the same Worker methods on the same blocks and units, hand the results back in plan order,
and write each shard's rows in the same order, so a preparation gives byte-identical output with either
(tests/trainer_data/test_data_parallel.py).

The Ray pool: `parallelism` actors of one CPU each, spread over the cluster's nodes (the KubeRay head has num-cpus
0, so they land on the worker pods). An actor loads the tokenizer once and parses or encodes many blocks. The parsed
examples of a block stay in Ray's object store (owned by the driver), as two lists, one per side of the held-out
split, until the units that pack them have run (a held-out unit gathers its few examples from many blocks, and
fetches only their held-out lists); so do each unit's packed rows, on the node of the actor that packed them, until
the shards are written. The driver only ever receives each block's per-record facts and each unit's row count.
Writing is a shuffle in two rounds: each actor cuts the rows of the units it packed into one piece per shard (the
driver's plan says which row goes where), then one actor per shard joins that shard's pieces back into global order
and writes and uploads the Parquet file. Every row crosses the network at most once, and no process holds more than
one shard. The actors are killed when the preparation ends, so their memory is free before the training workers
start.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kubetune_trainer.data.blocks import Block
from kubetune_trainer.data.records import Example
from kubetune_trainer.data.shards import shard_of_row, write_shard
from kubetune_trainer.data.spill import RowSpill
from kubetune_trainer.data.worker import BlockFacts, Settings, UnitRows, Worker, row_columns

log = logging.getLogger(__name__)

# A unit: the selected examples to pack together, in the global order, as (block index, side, place in that
# side's list: worker.Sides).
Unit = list[tuple[int, int, int]]
# The column of a shard piece that numbers its rows in the split's global order (never written to a shard).
ROW = "row"
# Shards written at once in one process: Parquet's compression and the upload let go of the GIL, so a few
# threads overlap one shard's compression with another's upload.
WRITE_THREADS = 4


class InlineExecutor:
    """The steps in this process, one after the other. A parsed block's examples wait on local disk (pickled,
    one file per side of the held-out split) until their unit is packed, so memory holds about one block of
    examples, not the dataset, and packing the held-out split reads only held-out examples; the packed rows of
    each split are spilled to local disk until the shards are cut."""

    def __init__(self, settings: Settings, tokenizer: Any, client: Any, directory: str):
        self.worker = Worker(settings, tokenizer, client)
        self.directory = directory
        os.makedirs(os.path.join(directory, "parsed"))
        self._loaded: dict[tuple[int, int], list[Example]] = {}
        # A mixture alternates between its sources: one block of each stays loaded.
        self.keep_blocks = max(1, len(settings.source_rules))
        self._spills: dict[str, RowSpill] = {}

    def _path(self, block: int, side: int) -> str:
        return os.path.join(self.directory, "parsed", f"block-{block}-{side}.pickle")

    def parse(self, blocks: list[Block]) -> list[BlockFacts]:
        """Parse the blocks in order; each next block's GET is sent (in a thread) while this one is parsed."""
        facts = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-open") as pool:
            ahead = pool.submit(self.worker.open_ahead, blocks[0]) if blocks else None
            try:
                for i, b in enumerate(blocks):
                    assert ahead is not None
                    opened, ahead = ahead.result(), None
                    if i + 1 < len(blocks):
                        ahead = pool.submit(self.worker.open_ahead, blocks[i + 1])
                    f, sides = self.worker.parse_block(b, opened)
                    for side, examples in enumerate(sides):
                        with open(self._path(b.index, side), "wb") as out:
                            pickle.dump(examples, out, protocol=pickle.HIGHEST_PROTOCOL)
                    facts.append(f)
            finally:
                if ahead is not None and ahead.exception() is None and ahead.result() is not None:
                    ahead.result().close()  # a stream opened for a block that will not be parsed (an error)
        return facts

    def _examples(self, unit: Unit) -> Iterator[Example]:
        for b, side, k in unit:
            if (b, side) not in self._loaded:
                if len(self._loaded) >= self.keep_blocks:
                    self._loaded.pop(next(iter(self._loaded)))
                with open(self._path(b, side), "rb") as f:
                    self._loaded[b, side] = pickle.load(f)
            yield self._loaded[b, side][k]

    def encode(self, split: str, units: Iterable[Unit]) -> Iterator[UnitRows]:
        """Pack the units of one split, in order; their rows are kept for write() (a UnitRows carries only the
        counts). Consume the iterator to the end."""
        spill = self._spills[split] = RowSpill(os.path.join(self.directory, split), row_columns(self.worker.settings))
        for unit in units:
            yield self.worker.encode_unit(self._examples(unit), spill)  # rows go straight to the spill
        spill.close()

    def write(self, split: str, shards: list[np.ndarray], width: int, uris: list[str]) -> list[int]:
        """Write shard r (the split's rows shards[r], in that order, trimmed to `width`) to uris[r]; the tokens
        in each."""
        columns = self._spills[split].read()

        def one(r: int) -> int:
            local = os.path.join(self.directory, f"{split}-{r}.parquet")
            return write_shard(columns, shards[r], width, local, self.worker.client, uris[r])

        with ThreadPoolExecutor(max_workers=min(len(uris), WRITE_THREADS)) as pool:
            return list(pool.map(one, range(len(uris))))

    def close(self) -> None:
        self._loaded.clear()


class PrepareActor:
    """A Ray actor's Worker (Ray wraps this class with ray.remote at run time)."""

    def __init__(self, settings: Settings, tokenizer: Any):
        self.worker = Worker(settings, tokenizer)
        # Everything alive now (transformers, the tokenizer, Ray's own: ~300k objects) lives as long as the actor:
        # out of the garbage collector's full collections. Ray unpickles a task's examples (thousands of objects
        # per block) before our code can pause the collector, and each full collection it sets off walks the
        # whole heap: 0.30 s of unpickling 20,000 examples, 0.06 s with the old objects frozen.
        gc.freeze()

    def parse(self, block: Block) -> tuple[BlockFacts, list[Example], list[Example]]:
        facts, (train_side, held_side) = self.worker.parse_block(block)
        return facts, train_side, held_side

    def encode(self, picks: list[tuple[int, int]], *example_lists: list[Example]) -> tuple[UnitRows, list[Any]]:
        """The unit's counts (to the driver) and its packed rows (left in the object store)."""
        unit = self.worker.encode_unit([example_lists[p][k] for p, k in picks])
        blocks, unit.blocks = unit.blocks, []
        return unit, blocks

    def cut(self, rows: np.ndarray, owner: np.ndarray, num_shards: int, *units: list[dict[str, np.ndarray]]) -> Any:
        """The rows of units this actor packed, one piece per shard: rows gives the global number of each of
        their rows (in order), owner its shard (-1: dropped). Each piece carries its rows' numbers ("row"), so
        that a shard's writer can put pieces from several actors back in global order. One piece is returned
        as itself: Ray hands back a single object for num_returns=1."""
        columns = row_columns(self.worker.settings)
        parts: list[dict[str, list[np.ndarray]]] = [{name: [] for name in [*columns, ROW]} for _ in range(num_shards)]
        start = 0
        for block in (b for unit in units for b in unit):  # block by block: the rows are never copied whole
            n = len(next(iter(block.values())))
            mine = owner[start : start + n]
            for r in range(num_shards):
                take = mine == r
                for name in columns:
                    parts[r][name].append(block[name][take])
                parts[r][ROW].append(rows[start : start + n][take])
            start += n
        empty = {name: np.zeros((0, w) if w else (0,), dtype=dtype) for name, (dtype, w) in columns.items()}
        empty[ROW] = np.zeros(0, dtype=np.int64)
        pieces = [{name: np.concatenate([empty[name], *cols]) for name, cols in p.items()} for p in parts]
        return pieces[0] if num_shards == 1 else tuple(pieces)

    def write(self, uri: str, width: int, *pieces: dict[str, np.ndarray]) -> int:
        """One shard from its pieces, its rows in ascending global order (as in one process); the tokens in it."""
        columns = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
        order = np.argsort(columns.pop(ROW), kind="stable")
        with tempfile.TemporaryDirectory(prefix="kubetune-shard-") as tmp:
            return write_shard(columns, order, width, os.path.join(tmp, "shard.parquet"), self.worker.client, uri)


class RayExecutor:
    """The steps in `parallelism` Ray actors; results come back in plan order."""

    def __init__(self, settings: Settings, tokenizer: Any, parallelism: int):
        import ray

        self.ray = ray
        actor: Any = ray.remote(PrepareActor)
        # A lost actor (its process killed, or its node drained) is started again on a live node, and its tasks
        # wait for it and run again, however often the restart takes to be noticed: a fixed number of task
        # retries runs out while a dead node's actor is still "temporarily unavailable". The packed rows that
        # died with a node are rebuilt from their lineage (parse and encode again), which needs the same.
        actor = actor.options(
            num_cpus=1,
            scheduling_strategy="SPREAD",
            max_restarts=4,
            max_task_retries=-1,
            # One CPU reserved, one tokenizer thread: the fast tokenizer's batch call otherwise starts a thread
            # per core of the node in every actor (64 actors on a 64-core node: 4,096 threads on 64 cores).
            runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}},
        )
        self.tokenizer_ref = ray.put(tokenizer)  # held while the actors live: a restarted actor needs it again
        self.actors: list[Any] = [actor.remote(settings, self.tokenizer_ref) for _ in range(parallelism)]
        self.refs: dict[tuple[int, int], Any] = {}  # (block index, side) -> that side's parsed examples
        # split -> (actor that packed the unit, its rows, its row count) per unit, in order
        self.units: dict[str, list[tuple[int, Any, int]]] = {}
        # Waited for here, so that the log tells start-up (a process importing transformers and loading the
        # tokenizer, on a node that may first pull the image) from the work; the tasks would wait for it anyway.
        started = time.monotonic()
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        log.info("preparing the data in %d Ray actors (started in %.1f s)", parallelism, time.monotonic() - started)

    def parse(self, blocks: list[Block]) -> list[BlockFacts]:
        fact_refs = []
        for i, b in enumerate(blocks):
            facts_ref, *sides = self.actors[i % len(self.actors)].parse.options(num_returns=3).remote(b)
            fact_refs.append(facts_ref)
            for side, ref in enumerate(sides):
                self.refs[b.index, side] = ref
        return list(self.ray.get(fact_refs))

    def encode(self, split: str, units: Iterable[Unit]) -> Iterator[UnitRows]:
        """As InlineExecutor.encode; the rows stay in the object store, on the node that packed them."""
        done = self.units[split] = []
        submitted = []
        for i, unit in enumerate(units):
            a = i % len(self.actors)
            lists = sorted({(b, side) for b, side, _ in unit})
            position = {key: p for p, key in enumerate(lists)}
            picks = [(position[b, side], k) for b, side, k in unit]
            counts_ref, rows_ref = (
                self.actors[a].encode.options(num_returns=2).remote(picks, *[self.refs[key] for key in lists])
            )
            submitted.append((a, counts_ref, rows_ref))
        for a, counts_ref, rows_ref in submitted:
            counts: UnitRows = self.ray.get(counts_ref)
            done.append((a, rows_ref, counts.rows))
            yield counts

    def write(self, split: str, shards: list[np.ndarray], width: int, uris: list[str]) -> list[int]:
        """As InlineExecutor.write, in the actors: each actor cuts the units it packed into one piece per shard,
        each shard is joined and written by one actor."""
        self.refs.clear()  # every unit is packed by now: the parsed examples can go
        units = self.units.pop(split)
        owner = shard_of_row(sum(n for _, _, n in units), shards)
        starts = np.cumsum([0] + [n for _, _, n in units])
        pieces = []
        for a, actor in enumerate(self.actors):
            # One cut per actor, not per unit: pieces stay few and large whatever the number of shards (Ray
            # hands a task's small results to the driver; thousands of small pieces would bring it the rows).
            mine = [u for u, (packer, _, _) in enumerate(units) if packer == a]
            if not mine:
                continue
            rows = np.concatenate([np.arange(starts[u], starts[u + 1]) for u in mine])
            cut = actor.cut.options(num_returns=len(uris)).remote(
                rows, owner[rows], len(uris), *[units[u][1] for u in mine]
            )
            pieces.append([cut] if len(uris) == 1 else cut)
        tokens = [
            self.actors[r % len(self.actors)].write.remote(uris[r], width, *[p[r] for p in pieces])
            for r in range(len(uris))
        ]
        return list(self.ray.get(tokens))

    def close(self) -> None:
        self.refs.clear()
        self.units.clear()
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
