"""Prepare the training data once (STUB: being written)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune.api import TrainerConfig


@dataclass
class PreparedData:
    manifest_uri: str
    train_shards: list[str]
    validation_shards: list[str]
    stats: dict[str, Any]
    num_train_sequences: int
    fingerprint: str
    seq_length: int


def prepare(cfg: TrainerConfig, tokenizer: Any, num_shards: int, client: Any = None) -> PreparedData:
    raise NotImplementedError


def load_shard(uri_list: list[str], client: Any = None) -> dict[str, np.ndarray]:
    raise NotImplementedError


def batch_indices(num_rows: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    raise NotImplementedError
