"""Checkpoint versions at rest: the node's store (staging, commit, verify: `store`), the
catalog (`catalog`, `remote_catalog`), digests verified once (`verified`), remote stores
by kind (`backends`, `remote`, `objectstore`), where a restore reads from (`sources`),
retention, the quarantine of node classes, and the control side's answers to the CLI
(`queries`).

May import: `activities.criu`, `activities.gpu`, `activities.host`, `activities.steps`,
`activities.contracts`, `api`.
"""
