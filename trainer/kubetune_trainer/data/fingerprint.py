"""The identity of a preparation: same fingerprint, same prepared shards, so a finished one can be reused."""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from typing import Any

from kubetune.api import TrainerConfig

# Bump when the prepared layout or any preprocessing rule changes, so old outputs are not reused.
PREPARED_FORMAT_VERSION = 2  # 2: rows are packed per unit of examples (prepare.UNIT_EXAMPLES)


# The serialised tokenizer is several MB: hash it once per tokenizer object, not on every prepare() call.
_IDENTITIES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes token ids: vocabulary, merges, normalisers and
    special tokens (the serialised fast tokenizer), plus the chat template and special-token ids."""
    try:
        return _IDENTITIES[tokenizer]
    except (KeyError, TypeError):
        pass
    ident = _tokenizer_hash(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable: just recompute next time
        _IDENTITIES[tokenizer] = ident
    return ident


def _tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        for i in range(0, len(text), 1 << 20):  # in slices, so the UTF-8 copy is never the whole text
            h.update(text[i : i + (1 << 20)].encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, type(tokenizer).__name__]
    h.update(json.dumps(ids).encode("utf-8"))
    return h.hexdigest()


def fingerprint(
    cfg: TrainerConfig,
    train_objects: list[dict[str, Any]],
    validation_objects: list[dict[str, Any]],
    tokenizer_id: str,
    num_shards: int,
) -> str:
    ds = cfg.spec.dataset
    # Where the data is read from (endpoint, region, credentials) does not change what it contains; the
    # objects' ETags and sizes do.
    spec = ds.wire()
    for k in ("endpoint", "region", "credentialsSecret"):
        spec.pop(k, None)
    doc = {
        "version": PREPARED_FORMAT_VERSION,
        "dataset": spec,
        "task": cfg.spec.model.task,
        "numLabels": cfg.spec.model.num_labels,
        "seed": cfg.spec.training.seed,  # drives the validation split and the shard shuffle
        "numShards": num_shards,
        "tokenizer": tokenizer_id,
        "train": [(o["uri"], o["etag"], o["size"]) for o in train_objects],
        "validation": [(o["uri"], o["etag"], o["size"]) for o in validation_objects],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()[:16]
