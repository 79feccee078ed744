"""SeaweedFS stopped for 15 s while the trainer streams a data file: the stream re-opens where it was and goes on.

Real parts only: a SeaweedFS of the test's own (stopped by killing its process group, started again on the same
ports and data), the trainer's own client (`data.s3.s3_client`, as a rank builds it) and its own reader
(`data.readers.read_records`). The file is larger than loopback's socket buffers, so the outage cuts the
transfer in the middle: what the reader already holds is the buffered part, the rest must come from a re-opened,
ranged GET pinned to the same ETag.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_faults_support import StoppableS3

pytestmark = [pytest.mark.faults, pytest.mark.integration]

BUCKET = "stream-outage"
OUTAGE_S = 15.0
FILE_BYTES = 32 << 20  # well above the loopback receive buffer: the server's death cuts the body short
STOP_AFTER = 20_000  # records read before SeaweedFS is stopped


def _write_jsonl(path: Path) -> int:
    n = 0
    filler = "x" * 200
    with path.open("w") as f:
        while f.tell() < FILE_BYTES:
            f.write(json.dumps({"id": n, "text": f"record {n} {filler}"}) + "\n")
            n += 1
    return n


def test_s3_stopped_during_data_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault_row: Any
) -> None:
    from kubetune_cli.localenv.s3_server import S3Server
    from kubetune_trainer.data.readers import read_records
    from kubetune_trainer.data.s3 import list_objects, s3_client

    data = tmp_path / "data.jsonl"
    n = _write_jsonl(data)
    with S3Server(tmp_path / "s3", buckets=[BUCKET]) as server:
        server.client().upload_file(str(data), BUCKET, "train/data.jsonl")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        client = s3_client(server.endpoint_url, server.region)
        (obj,) = list_objects(client, f"s3://{BUCKET}/train/")
        s3 = StoppableS3(server)

        seen: list[int] = []
        gap, last = 0.0, time.monotonic()  # the longest wait between two records: the stream's stall
        errors: list[str] = []
        t_down = t_up = 0.0
        restarter: threading.Thread | None = None
        with caplog.at_level(logging.WARNING):
            for _location, record, error in read_records(client, obj, "jsonl"):
                if error is not None or record is None:
                    errors.append(str(error))
                    continue
                seen.append(int(record["id"]))
                now = time.monotonic()
                gap, last = max(gap, now - last), now
                if len(seen) == STOP_AFTER:
                    t_down = s3.stop()

                    def come_back() -> None:
                        nonlocal t_up
                        time.sleep(OUTAGE_S)
                        t_up = s3.start()

                    restarter = threading.Thread(target=come_back, daemon=True)
                    restarter.start()
        assert restarter is not None, f"the file held only {len(seen)} records"
        restarter.join(timeout=120)

    # Every record exactly once, in file order: nothing lost, nothing read twice across the re-open.
    assert errors == []
    assert seen == list(range(n))
    reopened = [r.getMessage() for r in caplog.records if "re-opening" in r.getMessage()]
    assert reopened, "the outage never reached the stream (the whole file was buffered before the stop)"
    # The re-opened GET waited for the server (botocore's standard retries first, then ours: either way the
    # stream stalled across the outage instead of failing the job).
    assert t_up > t_down and gap >= OUTAGE_S * 0.5, (gap, reopened)
    fault_row(
        "SeaweedFS stopped 15 s during data streaming",
        f"stream re-opened at its byte offset after the outage; all {n} records read once, in order",
        steps_redone=0,
        records_twice=0,
        recover_s=gap,
    )
