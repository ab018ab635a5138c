"""Composition roots: build settings and clients, run workers, the dev server and the CLI."""
