"""The trainer's data side: S3 streaming, record formats, preprocessing, packing and prepared shards.

The training side imports only what is re-exported here.
"""

from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.prepare import PreparedData, batch_indices, load_shard, prepare
from kubetune_trainer.data.s3 import list_objects, parse_uri, s3_client
from kubetune_trainer.data.shards import open_shard

__all__ = [
    "DataError",
    "PreparedData",
    "batch_indices",
    "list_objects",
    "load_shard",
    "open_shard",
    "parse_uri",
    "prepare",
    "s3_client",
]
