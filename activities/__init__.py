"""Activities: the node and control steps of the pipelines, one folder per external system.

Floors, top to bottom (imports point down only; `lint-imports` checks it in `make test`):

5. `local`, `runtime`, `kube`: one mode or system each, independent of each other: local
   processes and the state directory; pods' containers on a node, behind the container
   runtime seam; the Kubernetes API.
4. `pipeline`: what both restore paths share: stage timer, gate, opening a version.
3. `storage`: checkpoint versions: the node's store, catalog, caches, object storage,
   retention, quarantine.
2. `criu`, `gpu`: the CRIU program; NVML facts and the CUDA checkpoint API.
1. `host`: the Linux host: files, processes, node paths, sentinel files.
0. `steps`, `errors`, then `contracts` and `metrics`: the declarations workflows import,
   the error mapping, their inputs and outputs; the metrics every floor records.

Workflows import floor 0 only (`activities.steps`, `activities.contracts`); workers compose
the rest.
"""
