"""Checkpoint uploads off the training thread: one background upload per rank, at most one in flight.

Why: a checkpoint used to be written and uploaded to S3 inside the training step loop, so every rank waited
for the slowest upload at every checkpoint interval. Now each rank writes its files to node-local disk (fast)
and hands the folder to its `Uploads`, whose thread uploads it while training goes on.

The completeness rule is unchanged (kubetune_trainer.checkpoint): `_COMPLETE` is written last, by rank 0, only
once every rank's files are in S3. The ranks' threads cannot use the process group (collectives belong to the
training thread), so they coordinate through S3: each rank, after its last file, writes
`_uploaded/<token>/rank-NNNNN`; rank 0's thread waits until every rank's marker of this token is there, then
writes `_COMPLETE` and runs `on_complete` (retention and the status report). The token is drawn by rank 0 once
per worker-group start and broadcast, so a marker left by an earlier attempt never counts.

Bounds: `submit` first waits for the previous upload (so a rank's disk holds at most the checkpoint being
uploaded and the one just written), and raises the previous upload's error in the training thread: an S3
failure ends the training as it did when the upload was synchronous (after the same retries,
kubetune_trainer.storage). `drain` (collective) returns once the last checkpoint is complete on every rank.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.clock import now_rfc3339
from kubetune_trainer import storage
from kubetune_trainer.checkpoint import COMPLETE

log = logging.getLogger(__name__)

UPLOADED = "_uploaded"  # per-rank "my files are up" markers, under a token folder
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 0.5


class Uploads:
    """This rank's checkpoint uploader. Every rank has one; only rank 0's writes `_COMPLETE`."""

    def __init__(
        self,
        client: Any,
        *,
        rank: int,
        world: int,
        token: str,
        on_complete: Callable[[str, dict[str, Any]], None] | None = None,
    ):
        self.client, self.rank, self.world, self.token = client, rank, world, token
        self.on_complete = on_complete  # rank 0: called in the upload thread after _COMPLETE is written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abandon = threading.Event()  # set by close(): stop waiting for other ranks' markers

    @classmethod
    def for_worker_group(
        cls, client: Any, *, rank: int, world: int, on_complete: Callable[[str, dict[str, Any]], None] | None = None
    ) -> Uploads:
        """Collective: rank 0 draws this worker group's token and every rank receives it."""
        import torch.distributed as dist

        token = [uuid.uuid4().hex[:12] if rank == 0 else None]
        if dist.is_initialized() and world > 1:
            dist.broadcast_object_list(token, src=0)
        return cls(client, rank=rank, world=world, token=str(token[0]), on_complete=on_complete)

    def submit(self, local: Path, uri: str, marker: dict[str, Any]) -> None:
        """Upload `local` (this rank's files of checkpoint `uri`) in the background, then delete it. Waits for
        the previous upload first and raises its error. `marker` is the body of `_COMPLETE` (rank 0)."""
        self.wait()
        self._thread = threading.Thread(
            target=self._run, args=(local, uri, marker), name=f"kubetune-ckpt-upload-{self.rank}", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until this rank's upload in flight (on rank 0: the checkpoint's completion) is done; raise
        its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def drain(self) -> None:
        """Collective: when it returns on any rank, the last submitted checkpoint is complete in S3."""
        import torch.distributed as dist

        self.wait()
        if dist.is_initialized() and self.world > 1:
            dist.barrier()  # rank 0 leaves its wait() only after _COMPLETE

    def close(self, timeout: float) -> None:
        """Cleanup after a failure: give the upload in flight up to `timeout` s to finish (its checkpoint may
        still complete), then stop waiting; errors are logged, not raised."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._abandon.set()
                log.warning("checkpoint upload still running after %.0fs; abandoned", timeout)
        if self._error is not None:
            log.warning("checkpoint upload failed: %s: %s", type(self._error).__name__, self._error)
        self._thread, self._error = None, None

    # ---------------------------------------------------------------- the upload thread

    def _run(self, local: Path, uri: str, marker: dict[str, Any]) -> None:
        try:
            t0 = time.monotonic()
            storage.upload_dir(self.client, local, uri)
            storage.put_json(
                self.client,
                f"{uri}/{UPLOADED}/{self.token}/rank-{self.rank:05d}",
                {"rank": self.rank, "time": now_rfc3339()},
            )
            shutil.rmtree(local, ignore_errors=True)
            if self.rank == 0:
                self._wait_for_ranks(uri)
                if self._abandon.is_set():
                    return
                storage.put_json(self.client, f"{uri}/{COMPLETE}", marker)  # last: the checkpoint is usable
                if self.on_complete is not None:
                    self.on_complete(uri, {**marker, "uploadSeconds": round(time.monotonic() - t0, 3)})
        except BaseException as exc:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = exc
            shutil.rmtree(local, ignore_errors=True)

    def _wait_for_ranks(self, uri: str) -> None:
        """Until every rank's marker of this token is in S3 (rank 0's thread), or close() gives up."""
        pause = _POLL_FIRST_S
        while not self._abandon.is_set():
            done = storage.list_keys(self.client, f"{uri}/{UPLOADED}/{self.token}")
            if len(done) >= self.world:
                return
            self._abandon.wait(pause)
            pause = min(pause * 2, _POLL_MAX_S)
