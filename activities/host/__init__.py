"""The Linux host the worker runs on: atomic files and digests (`files`), `/proc` facts and
signals (`processes`), the node's own paths (`layout`) and sentinel files with inotify
waits (`sentinels`).

May import: `activities.contracts`, `api`. Nothing here knows CRIU, storage or a mode.
"""
