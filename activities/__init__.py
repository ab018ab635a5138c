"""Activities: one module per external system (local processes, CRIU, storage, sentinels, GPU)."""
