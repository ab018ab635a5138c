"""Local mode: workloads this node launches itself (`process`), dumps by PID (`dump`), the
restore of such a workload (`restore`) and claims and status records in the state
directory (`state`).

May import: `activities.pipeline` and every floor below it; never `runtime` or `kube`.
"""
