"""Pods' containers on a cluster node, behind one small runtime seam.

May import: `activities.pipeline` and every floor below it; never `local` or `kube`.
"""
