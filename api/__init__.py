"""The warmstart resource model: pure types, validation, checkpoint IDs and names (no I/O)."""
