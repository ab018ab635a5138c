"""The top layer: composition roots, the CLI, the dev server and client operations.

- composition roots: `compose.py` (activities and the control/node workers from settings),
  `embedded.py` (dev server plus both workers in one process: `warmstart dev`, `worker`)
- the CLI: `cli.py` (commands and the one error → exit-code mapping), `display.py`,
  `describing.py`, `demo.py`
- the dev server: `devserver.py` (the `temporal` CLI's start-dev as a child process)
- client operations: `operations.py` (start, follow, look up pipelines), `client.py`
- `settings.py` (the one Settings object), `telemetry.py`, `ports.py`
"""
