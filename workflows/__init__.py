"""Deterministic orchestration: the capture and restore workflows and their contracts."""
