"""Data: feature schema, Parquet shard writing/preparation, and sharded streaming batches."""
