"""Checkpoint versions at rest: the node's store (staging, commit, verify: `store`), the
catalog, digests verified once (`verified`), remote backends (`remote`, `objectstore`),
where a restore reads from (`sources`), retention and the quarantine of node classes.

May import: `activities.criu`, `activities.gpu`, `activities.host`, `activities.steps`,
`activities.contracts`, `api`.
"""
