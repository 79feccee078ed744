"""S3 access against the real SeaweedFS: listing, credentials from the environment, ranged Parquet reads."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from data_test_helpers import BUCKET, parquet_bytes

from kubetune_trainer.data import DataError, list_objects, prepare, s3_client
from kubetune_trainer.data.blocks import BLOCK_BYTES, plan_blocks
from kubetune_trainer.data.executors import InlineExecutor
from kubetune_trainer.data.readers import read_records
from kubetune_trainer.data.s3 import ObjectStream, RangeFile, open_stream
from kubetune_trainer.data.worker import Settings

pytestmark = pytest.mark.integration


def test_list_object_prefix_and_pagination(s3, put, prefix):
    keys = [f"{prefix}/set/part-{i}.jsonl" for i in (3, 0, 4, 1, 2)]
    for k in keys:
        put(k, b"{}\n", "raw")
    put(f"{prefix}/set/_SUCCESS", b"", "raw")
    put(f"{prefix}/set/.part-0.jsonl.crc", b"x", "raw")
    put(f"{prefix}/set-sibling.jsonl", b"{}\n", "raw")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/set/sub/", Body=b"")  # a folder marker

    listed = list_objects(s3, f"s3://{BUCKET}/{prefix}/set", page_size=2)  # 3 pages at least
    assert [o["key"] for o in listed] == sorted(keys)
    assert all(o["size"] == 3 and o["etag"] and o["uri"] == f"s3://{BUCKET}/{o['key']}" for o in listed)
    assert [o["key"] for o in list_objects(s3, f"s3://{BUCKET}/{prefix}/set/")] == sorted(keys)
    one = list_objects(s3, f"s3://{BUCKET}/{prefix}/set/part-1.jsonl")
    assert [o["key"] for o in one] == [f"{prefix}/set/part-1.jsonl"]
    assert list_objects(s3, f"s3://{BUCKET}/{prefix}/nothing") == []
    with pytest.raises(DataError, match="does not exist"):
        list_objects(s3, "s3://no-such-bucket-kt/x")


def test_client_from_environment_credentials(s3_server, put, prefix, monkeypatch):
    put(f"{prefix}/env.jsonl", b'{"text": "x"}\n', "raw")
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    client = s3_client(s3_server.endpoint_url, "us-east-1")
    assert [o["key"] for o in list_objects(client, f"s3://{BUCKET}/{prefix}")] == [f"{prefix}/env.jsonl"]

    # A wrong secret is refused by the server, and the error never carries the secret.
    wrong = "wrong-" + s3_server.secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    client = s3_client(s3_server.endpoint_url, "us-east-1")
    with pytest.raises(ClientError) as e:
        list_objects(client, f"s3://{BUCKET}/{prefix}")
    assert wrong not in str(e.value) and s3_server.secret_key not in str(e.value)


def test_parquet_read_by_ranges_row_groups(s3, put, prefix):
    rows = [{"text": f"row {i}", "other": i} for i in range(2500)]
    uri = put(f"{prefix}/big.parquet", parquet_bytes(rows, row_group_size=500), "raw")
    (obj,) = list_objects(s3, uri)
    got = list(read_records(s3, obj, "auto", columns=["text", "missing"]))
    assert len(got) == 2500
    assert got[0] == (f"{uri} row 1", {"text": "row 0"}, None)  # only the requested columns are read
    assert got[-1][0] == f"{uri} row 2500"
    f = RangeFile(s3, obj)
    f.seek(-4, 2)
    assert f.read(4) == b"PAR1"


def test_unreadable_files_fail_clearly(tokenizer, s3, put, prefix, make_cfg):
    put(f"{prefix}/bad/a.parquet", b"this is not parquet", "raw")
    cfg = make_cfg({"train": f"s3://{BUCKET}/{prefix}/bad", "format": "completion"})
    with pytest.raises(DataError, match="a.parquet is not a readable Parquet file"):
        prepare(cfg, tokenizer, num_shards=1, client=s3)
    put(f"{prefix}/gz/a.jsonl.gz", b"not gzip at all", "raw")
    cfg = make_cfg({"train": f"s3://{BUCKET}/{prefix}/gz", "format": "completion"})
    with pytest.raises(DataError, match="cannot read .*a.jsonl.gz"):
        prepare(cfg, tokenizer, num_shards=1, client=s3)
    put(f"{prefix}/csv/a.csv", b"text\nx\n", "raw")
    cfg = make_cfg({"train": f"s3://{BUCKET}/{prefix}/csv", "format": "completion"})
    with pytest.raises(DataError, match="set spec.dataset.fileFormat"):
        prepare(cfg, tokenizer, num_shards=1, client=s3)


def test_stream_survives_a_dropped_connection(s3, put, prefix, caplog):
    data = b"".join(b"line %06d\n" % i for i in range(100000))
    uri = put(f"{prefix}/long.jsonl", data, "raw")
    (obj,) = list_objects(s3, uri)
    stream = ObjectStream(s3, obj)
    first = stream.read(1000)
    stream._body._raw_stream.close()  # the connection drops half-way through the body
    rest = b"".join(iter(lambda: stream.read(1 << 16), b""))
    assert first + rest == data
    assert "re-opening" in caplog.text and "at byte 1000" in caplog.text


def test_stream_refuses_an_object_rewritten_while_read(s3, put, prefix):
    uri = put(f"{prefix}/moving.jsonl", b"a" * 100000, "raw")
    (obj,) = list_objects(s3, uri)
    stream = ObjectStream(s3, obj)
    stream.read(1000)
    put(f"{prefix}/moving.jsonl", b"b" * 100000, "raw")
    stream._body._raw_stream.close()
    with pytest.raises(DataError, match="changed while it was being read"):
        stream.read(1000)


def test_a_ranged_block_asks_for_its_bytes_only(s3, put, prefix):
    # Lines of 1 KB, and one of 300 KB that starts inside the first block and ends far past it.
    lines = [b'{"text": "%s"}\n' % (b"a" * 1000) for _ in range(200)]
    lines.insert(150, b'{"text": "%s"}\n' % (b"b" * 300_000))
    data = b"".join(lines)
    uri = put(f"{prefix}/ranged.jsonl", data, "raw")
    (obj,) = list_objects(s3, uri)
    ranges: list[str] = []
    s3.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers["Range"].decode())
    )
    tail = ObjectStream.TAIL_BYTES
    end = 100_000
    stream = open_stream(s3, obj, start=0, stop=end)
    got, pos = [], 0
    while pos < end:  # what read_jsonl_range does: the lines that start before `end`
        got.append(stream.readline())
        pos += len(got[-1])
    stream.close()
    assert got == lines[: len(got)] and len(got) == 99
    assert ranges == [f"bytes=0-{end + tail - 1}"]

    # The long line: the first range ends inside it, each next one reaches twice as far as the one before.
    ranges.clear()
    start = sum(map(len, lines[:150]))
    stream = open_stream(s3, obj, start=start, stop=start + 10)
    assert stream.readline() == lines[150]
    stream.close()
    first = start + 10 + tail
    # 300 KB: ranges of 64, 128 and up to 256 KB (the object's end) cover it.
    assert ranges == [
        f"bytes={start}-{first - 1}",
        f"bytes={first}-{first + 2 * tail - 1}",
        f"bytes={first + 2 * tail}-{min(first + 6 * tail, len(data)) - 1}",
    ]


def test_a_file_rewritten_after_listing_is_refused_when_read_ahead(tokenizer, s3, put, prefix, make_cfg, tmp_path):
    # In one process the next block's GET is sent (in a thread) while this one is parsed: the second file,
    # rewritten after it was listed, is refused there, and the error reaches the preparation unchanged.
    rows = [{"text": f"record {i}"} for i in range(50)]
    put(f"{prefix}/two/a.jsonl", rows)
    put(f"{prefix}/two/b.jsonl", rows)
    cfg = make_cfg({"train": f"s3://{BUCKET}/{prefix}/two", "format": "completion"})
    blocks = plan_blocks(s3, list_objects(s3, f"s3://{BUCKET}/{prefix}/two"), "auto", 0, 0, BLOCK_BYTES)
    assert len(blocks) == 2
    put(f"{prefix}/two/b.jsonl", rows[::-1])
    executor = InlineExecutor(Settings.from_config(cfg), tokenizer, s3, str(tmp_path))
    with pytest.raises(DataError, match=r"two/b\.jsonl changed while it was being read"):
        executor.parse(blocks)
