# Plain entry points. Every target sets up what it needs: `make serve` and `make test` work on a
# fresh clone with nothing but Python 3.11 installed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
# The model store lives outside the repository, so `bentoml build` never copies it in.
export BENTOML_HOME ?= $(HOME)/bentoml
export BENTOML_DO_NOT_TRACK := true
ARTIFACTS := $(wildcard models/artifacts/*)

.PHONY: setup register serve test lint unit integration e2e load bench bench-locust bench-decoding train-sentiment train-translate clean validate-manifests smoke smoke-split image-context gpu-check thread-bench bento

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,load]'
	touch $@

setup: $(BIN)/.installed

## Import the committed, trained artifacts into the BentoML model store (idempotent).
register: setup
	$(BIN)/python -m training.registry $(ARTIFACTS)

## Set up, register, and serve every model on http://127.0.0.1:$(PORT).
serve: register
	$(BIN)/bentoml serve services.api:Api --host 127.0.0.1 --port $(PORT)

## Set up and run the whole test suite (what CI runs).
test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: setup
	$(BIN)/python -m pytest tests/integration

e2e: setup
	$(BIN)/python -m pytest tests/e2e

## Bounded headless Locust run against a server it starts itself; reports in load/reports/
## (summary.md with the server's view from /metrics, charts, Locust CSV/HTML). Step load: ARGS=--shape step
load: register
	$(BIN)/python -m load.run $(ARGS)

## Each model's in-process ceiling against the service, batching on and off, length groups;
## prints the tables and writes load/reports/bench.json (results: load/RESULTS.md). Takes ~10 min.
bench: register
	$(BIN)/python -m load.bench $(ARGS)

## One Locust process (closed loop, wait 0) at 1/16/64/256 users on sentiment, then forecast windows
## (rows, then the same bars as columns): req/s, p50/p99, failures by status, server CPU per request;
## ARGS="--profile-users 256" adds a profiled step split by stage (load/breakdown.py). Another server
## on 127.0.0.1: ARGS="--url http://127.0.0.1:PORT[/path] --server-pid PID". Writes load/reports/locust_bench_*.json.
bench-locust: register
	$(BIN)/python -m load.locust_bench --endpoint sentiment $(ARGS)
	$(BIN)/python -m load.locust_bench --endpoint forecast $(ARGS)
	$(BIN)/python -m load.locust_bench --endpoint forecast-columns $(ARGS)

## Translate and caption before and after iteration-level decoding (issue 16), one run: static ceilings,
## greedy and beam 4 at 1/16/64/256 clients, 64 and 256 streams. ARGS="--before DIR" (a checkout of the
## earlier code: git archive eda1527 | tar -x -C DIR) [--seconds 8]. ~9 min; load/reports/bench_decoding.*
bench-decoding: register
	$(BIN)/python -m load.bench_decoding $(ARGS)

train-sentiment: setup
	$(BIN)/python -m training.train_sentiment

## English->Spanish translator: bounded by its config's max_minutes (58) plus test-set scoring.
train-translate: setup
	$(BIN)/python -m training.train_translate

## Vanishing/exploding gradients measured (tanh RNN, GRU, LSTM): charts and table in
## training/reports/gradients/.
gradient-study: setup
	$(BIN)/python -m training.gradient_study

## Deployment checks without a cluster: kustomize + kubernetes-validate (1.30, 1.37), ServiceMonitor
## schema, promtool rules and rule unit tests, dashboard queries (also part of `make test`).
validate-manifests: setup
	$(BIN)/python -m pytest tests/unit/test_manifests.py

## Build context for deploy/Dockerfile (wheelhouse + artifacts) in $(CONTEXT); needs PyPI on the host.
CONTEXT ?= /var/tmp/rnnserve-context
image-context: setup
	PYTHON=$(BIN)/python deploy/context.sh $(CONTEXT)

## Container smoke test with Podman as root (Debian podman buildah runc catatonit netavark aardvark-dns
## debootstrap): build offline, `podman kube play` the entry Deployment (embedded mode), one request per
## model, report size and time to ready, tear down.
smoke: setup
	PYTHON=$(abspath $(BIN))/python deploy/smoke.sh

## Container smoke test of the split (root; also netavark aardvark-dns): every Deployment of the CPU
## overlay played on one Podman network, one request per model through the entry, the translate pod
## stopped (the others answer, translate 503) and started again; time to ready per pod, recovery time.
smoke-split: setup
	PYTHON=$(abspath $(BIN))/python deploy/smoke_split.sh

## On a CUDA machine: every model on cuda against cpu, outputs within tolerance, items/s per batch
## size. Needs only torch + the artifacts: `python3 deploy/gpu_check.py` runs without this venv.
gpu-check: setup
	$(BIN)/python deploy/gpu_check.py $(ARGS)

## BentoML's own build: a Bento (services + the four models by tag) in $(BENTOML_HOME); prints its tag.
bento: register
	$(BIN)/python deploy/bento_requirements.py --check
	$(BIN)/bentoml build

## CPU threads per worker against workers, for the sentiment service (prints a table).
thread-bench: register
	$(BIN)/python deploy/thread_bench.py

clean:
	rm -rf $(VENV) load/reports .pytest_cache .ruff_cache
