# warmstart: `make demo` and `make test` do all set-up on a fresh machine, then run.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup venv dynamo criu containerd kube-apiserver kube-node nginx image lint test demo clean-state

setup: venv dynamo criu containerd kube-apiserver kube-node nginx

# uv installs the locked dependency set in seconds where pip takes many minutes. Bytecode is
# compiled at install (and ours on every setup): where PYTHONDONTWRITEBYTECODE is set, every
# CLI start would otherwise recompile each module it imports.
venv: $(VENV)/.synced
	@$(BIN)/python -m compileall -q api activities workflows workers examples >/dev/null
$(VENV)/.synced: pyproject.toml uv.lock
	@uv=$$(bash scripts/ensure-uv.sh $(PY)) && UV_COMPILE_BYTECODE=1 $$uv sync --frozen --quiet
	@touch $@

# Dynamo's published worker code (ai-dynamo, hash-pinned), for the tests only: installed
# without its dependencies into a folder of the tests' own, never into the venv.
DYNAMO := tests/.deps/ai-dynamo
dynamo: $(DYNAMO)/.installed
$(DYNAMO)/.installed: tests/requirements-dynamo.txt $(VENV)/.synced
	@rm -rf $(DYNAMO)
	@uv=$$(bash scripts/ensure-uv.sh $(PY)) && $$uv pip install --quiet --no-deps \
		--require-hashes --python $(BIN)/python --target $(DYNAMO) -r $<
	@touch $@

# CRIU >= 4.2 when missing (built once, installed to /usr/local); skipped when not root.
criu:
	@bash scripts/install-criu.sh

# containerd, runc and iptables for the container tests, when missing (root only).
containerd:
	@bash scripts/install-containerd.sh

# A real kube-apiserver (built once from Debian's source, minutes) and etcd for the
# integration tier (root only; a failed build makes those tests skip with its reason).
kube-apiserver:
	@bash scripts/install-kube-apiserver.sh

# The rest of a real one-node cluster for the real-node tier: kubelet, kube-scheduler,
# kube-controller-manager and kubectl (built once from the same source, about ten minutes),
# a static pause and Debian's CNI plugins (root only; a failed build makes the tier skip).
kube-node: kube-apiserver
	@bash scripts/install-kube-node.sh

# nginx, the TLS terminator (gRPC, client certificates required) the Temporal TLS tests put
# in front of the dev server (root only; without it those tests skip with the reason).
nginx:
	@bash scripts/install-nginx.sh

# The warmstart image from deploy/docker/Dockerfile, built without a registry or a Docker
# engine (root only; decision 0031): a docker-archive tarball whose path it prints, cached by
# a key over the image's inputs. Not part of setup: any edit of the sources changes the key,
# and the image tests build it themselves (tests/images.py), so only they pay for it.
image:
	@bash scripts/build-image.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest

demo: setup
	$(BIN)/warmstart demo
