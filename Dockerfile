# The serving image: TorchServe + the kit's handlers, serving the archives mounted at
# /home/serve/model_store (the default command); or the same archives on KServe's ModelServer, the
# Open Inference Protocol over REST and gRPC (command `serve-kserve`: docker-compose.yml's kserve
# service, deploy/kserve/kit-modelserver.yaml). Built by `docker compose up --build`.
#
# BASE_IMAGE: any Debian bookworm image. The default, python:3.11-slim-bookworm, needs a
# registry; `make docker-offline` imports a local Debian base instead and writes it to .env.
# Python packages come from docker/wheels/ when that holds wheels (machines without PyPI),
# else from the package index (a CPU build of torch from the PyTorch CPU index).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- stage 1: the virtual environment (its pip caches and the wheelhouse stay here)
FROM ${BASE_IMAGE} AS venv
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# python images bring Python 3.11 in /usr/local; a bare Debian base gets Debian's (also 3.11).
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY docker/requirements-serve.txt /build/requirements-serve.txt
COPY docker/wheels/ /build/wheels/
RUN python3 -m venv /opt/venv \
 && if ls /build/wheels/*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /build/wheels -r /build/requirements-serve.txt; \
    else \
      /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /build/requirements-serve.txt; \
    fi \
 # What serving never uses: C++ headers, CMake files, static libraries, pip itself, the Kubernetes
 # client's asyncio copy (kserve imports only kubernetes.client, 68 MB), pandas' own tests.
 && site=/opt/venv/lib/python3.11/site-packages \
 && rm -rf $site/torch/include $site/torch/share $site/torch/lib/*.a \
           $site/pip $site/setuptools $site/wheel $site/*.dist-info/RECORD.jws \
           $site/kubernetes/aio $site/pandas/tests \
 && find /opt/venv -name "*.pyc" -path "*/tests/*" -delete
# A form-typed body (curl --data-binary without -H) reaches the handler as raw bytes instead of a
# 500 from the frontend: frontend-patch/apply.py swaps the class compiled in the repository into the
# jar (no JDK, no Java at all in this stage), as `make java` does natively.
COPY frontend-patch/ /build/frontend-patch/
RUN /opt/venv/bin/python /build/frontend-patch/apply.py

# ---- stage 2: the runtime: a JRE, the same Python, the venv; no compilers, no caches
# procps for /bin/kill: TorchServe stops an unregistered version's workers with `kill -9 PID`
# (Runtime.exec, no shell), and without it the unregister fails with "Interrupted while cleaning resources".
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN python_packages=$(python3 -c "import sys" 2>/dev/null || echo python3) \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps $python_packages \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && useradd --system --uid 10001 --create-home --home-dir /home/serve --shell /usr/sbin/nologin serve
COPY --from=venv /opt/venv /opt/venv
COPY config.properties docker/log4j2.xml /home/serve/
# serve-kserve runs python -m handlers.kserve_model from /opt/kit, and the memory and health checks
# read the archives with its handlers/archive.py; TorchServe's workers use the handlers inside each
# archive instead.
COPY handlers/ /opt/kit/handlers/
# make rollout / rollback from inside (docker/rollout; docs/versions.md): standard library and handlers/ only.
COPY export/__init__.py export/rollout.py /opt/kit/export/
COPY docker/healthcheck.py docker/memory_budget.py /opt/kit/docker/
COPY docker/serve-kserve docker/serve docker/rollout /opt/venv/bin/
# The live record (handlers/store.py) beside the read-only store: docker-compose.yml mounts a volume here.
RUN install -d -o serve -g serve /home/serve/state
# Inside its own network namespace the server listens on all interfaces; compose publishes
# only 8080 and 8082 (TorchServe), 8085 and 8086 (serve-kserve). Logs go to stdout (log4j2.xml),
# unpacked archives to /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    LOG_LOCATION=/tmp/logs METRICS_LOCATION=/tmp/logs \
    KIT_LIVE_FILE=/home/serve/state/live.json \
    PYTHONDONTWRITEBYTECODE=1
USER serve
WORKDIR /home/serve
EXPOSE 8080 8082 8085 8086
# First the memory check (docker/memory_budget.py: the models must fit the container's limit, or it
# stops with one line saying what to change), then TorchServe in place of it.
# TorchServe with the live version of each model, after the memory check (docker/serve).
CMD ["serve"]
