"""GPUs: facts from NVML for manifests and compatibility (`nvml`), and the CUDA driver's
checkpoint API that moves a process's device memory to host memory and back (`cuda`).

May import: `activities.host`, `activities.contracts`, `api`.
"""
