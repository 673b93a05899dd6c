"""Corpora, token shards, preparation and packed loaders."""

from picollm.data.loader import PackedLoader, TokenStream, ValLoader, iter_val_batches
from picollm.data.prepare import PreparedData, PreparedDataError, load_prepared, prepare_data
from picollm.data.shards import ShardError, read_shard, shard_info, write_shard
from picollm.data.sources import DataSourceError, iter_documents, source_fingerprint, validate_source

__all__ = [
    "DataSourceError",
    "PackedLoader",
    "PreparedData",
    "PreparedDataError",
    "ShardError",
    "TokenStream",
    "ValLoader",
    "iter_documents",
    "iter_val_batches",
    "load_prepared",
    "prepare_data",
    "read_shard",
    "shard_info",
    "source_fingerprint",
    "validate_source",
    "write_shard",
]
