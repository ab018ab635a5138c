"""The Kubernetes API: the one client stack (`client`: the login, every call and the one
error mapping; `watch`: the one list-and-watch loop) and the control activities of a
cluster (`control`: claims, status on the resources, capture Jobs and their pods, node
selection).

May import: `activities.steps`, `activities.contracts`, `api`; never `runtime` or `local`.
"""
