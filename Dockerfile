# The serving images, one per engine, serving the archives mounted at /home/serve/model_store:
#   target torchserve (the last stage, so also a plain `docker build`): TorchServe + the kit's
#     handlers, a Java runtime, no KServe (docker-compose.yml's torchserve service);
#   target kserve: the same archives on KServe's ModelServer, the Open Inference Protocol over REST
#     and gRPC (serve-kserve: the kserve profile's service, deploy/kserve/kit-modelserver.yaml); no
#     Java, no TorchServe.
# Both serve both archive formats (torch for TorchScript, ONNX Runtime for ONNX). Built by
# `docker compose --profile kserve build` (both) or `docker compose build` (TorchServe's).
#
# BASE_IMAGE: any Debian bookworm image. The default, python:3.11-slim-bookworm, needs a
# registry; `make docker-offline` imports a local Debian base instead and writes it to .env.
# Python packages come from docker/wheels/ when that holds wheels (machines without PyPI),
# else from the package index (docker/build-venv.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build stages: a Python that makes venvs, then one venv per engine (pip caches and the wheelhouse stay here)
FROM ${BASE_IMAGE} AS python-build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# python images bring Python 3.11 in /usr/local; a bare Debian base gets Debian's (also 3.11).
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY docker/wheels/ /build/wheels/
COPY docker/build-venv.sh docker/requirements-serve.txt docker/requirements-torchserve.txt \
     docker/requirements-kserve.txt /build/

FROM python-build AS venv-torchserve
RUN sh /build/build-venv.sh /build/requirements-torchserve.txt
# A form-typed body (curl --data-binary without -H) reaches the handler as raw bytes instead of a
# 500 from the frontend: frontend-patch/apply.py swaps the class compiled in the repository into the
# jar (no JDK, no Java at all in this stage), as `make java` does natively.
COPY frontend-patch/ /build/frontend-patch/
RUN /opt/venv/bin/python /build/frontend-patch/apply.py

FROM python-build AS venv-kserve
RUN sh /build/build-venv.sh /build/requirements-kserve.txt

# ---- the kit's files both images carry: its handlers (serve-kserve runs python -m handlers.kserve_model
# from /opt/kit; the health and memory checks read the archives with handlers/archive.py; TorchServe's
# workers use the handlers inside each archive instead) and the health check.
FROM scratch AS kit
COPY handlers/ /opt/kit/handlers/
COPY docker/healthcheck.py /opt/kit/docker/

# ---- what both runtimes share: the base, the same Python, the non-root user; no compilers, no caches
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! python3 -c "import sys" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log; \
    fi \
 && useradd --system --uid 10001 --create-home --home-dir /home/serve --shell /usr/sbin/nologin serve
# Inside its own network namespace a server listens on all interfaces; compose publishes only its
# inference and metrics ports.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/serve

# ---- target kserve: KServe's ModelServer, REST 8085 (also /metrics) and gRPC 8086
FROM runtime AS kserve
COPY --from=venv-kserve /opt/venv /opt/venv
COPY --from=kit /opt/kit /opt/kit
COPY docker/serve-kserve /opt/venv/bin/
USER serve
EXPOSE 8085 8086
# docker-compose.yml's kserve service adds --workers; deploy/kserve/kit-modelserver.yaml its own ports.
CMD ["serve-kserve", "--model_store", "/home/serve/model_store", "--host", "0.0.0.0", \
     "--http_port", "8085", "--grpc_port", "8086"]

# ---- target torchserve: TorchServe's Java frontend and Python workers, 8080 (inference) and 8082 (metrics)
# procps for /bin/kill: TorchServe stops an unregistered version's workers with `kill -9 PID`
# (Runtime.exec, no shell), and without it the unregister fails with "Interrupted while cleaning resources".
FROM runtime AS torchserve
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
COPY --from=venv-torchserve /opt/venv /opt/venv
COPY --from=kit /opt/kit /opt/kit
COPY config.properties docker/log4j2.xml /home/serve/
# make rollout / rollback from inside (docker/rollout; docs/versions.md): standard library and handlers/ only.
COPY export/__init__.py export/rollout.py /opt/kit/export/
COPY docker/memory_budget.py /opt/kit/docker/
COPY docker/serve docker/rollout /opt/venv/bin/
# The live record (handlers/store.py) beside the read-only store: docker-compose.yml mounts a volume here.
RUN install -d -o serve -g serve /home/serve/state
# Logs go to stdout (log4j2.xml), unpacked archives to /tmp; management on the container's loopback only.
ENV TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_METRICS_ADDRESS=http://0.0.0.0:8082 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    LOG_LOCATION=/tmp/logs METRICS_LOCATION=/tmp/logs \
    KIT_LIVE_FILE=/home/serve/state/live.json
USER serve
EXPOSE 8080 8082
# TorchServe with the live version of each model, after the memory check (docker/serve): the models must
# fit the container's limit (docker/memory_budget.py), or it stops with one line saying what to change.
CMD ["serve"]
