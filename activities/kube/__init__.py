"""The Kubernetes API: the control activities of a cluster (`control`: claims, status on the
resources, capture Jobs and their pods, node selection).

May import: `activities.steps`, `activities.contracts`, `api`; never `runtime` or `local`.
"""
