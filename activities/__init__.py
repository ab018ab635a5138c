"""Activities: one module per external system (local processes, CRIU, storage, sentinels,
GPU), their contracts, the checkpoint catalog, and the one place errors become Temporal's."""
