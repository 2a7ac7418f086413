"""ClickHouse history for the stream: schema and migrations, the sink, the store client."""

from stream.store.client import Store, StoreConfig, StoreError, StoreLocked, StoreUnavailable, open_store
from stream.store.schema import EVENT_COLUMNS, EVENT_SCHEMA
from stream.store.sink import InsertResult, Sink, batch_token, rows_to_table

__all__ = [
    "EVENT_COLUMNS",
    "EVENT_SCHEMA",
    "InsertResult",
    "Sink",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "batch_token",
    "open_store",
    "rows_to_table",
]
