"""Sample workloads, e.g. a CPU stand-in for an LLM inference worker:
`python -m examples.inference_worker`."""
