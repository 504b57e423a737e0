#!/bin/sh
# Builds /opt/venv in a build stage of the Dockerfile from one engine's requirements file
# (docker/requirements-torchserve.txt or docker/requirements-kserve.txt): from the wheelhouse in
# /build/wheels when it holds wheels (machines without PyPI), else from the package index (a CPU
# build of torch from the PyTorch CPU index). Then removes what serving never imports, so that only
# the venv itself reaches the final image.
# Run: sh build-venv.sh REQUIREMENTS
set -eu
requirements=$1
python3 -m venv /opt/venv
if ls /build/wheels/*.whl >/dev/null 2>&1; then
  /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /build/wheels -r "$requirements"
else
  /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r "$requirements"
fi
# torch's compiler stack (torch.compile, symbolic shapes, inductor's code templates, hub and
# storage helpers): neither `import torch` nor loading and running a TorchScript file imports
# these, and nothing else in either image requires them (about 80 MB).
/opt/venv/bin/pip uninstall --yes --quiet sympy mpmath networkx jinja2 markupsafe fsspec filelock
site=/opt/venv/lib/python3.11/site-packages
# C++ headers, CMake files, static libraries and torch's C++ test programs (all of torch/bin but
# the shared-memory manager that torch.multiprocessing starts), pip itself, the Kubernetes client's
# asyncio copy (kserve imports only kubernetes.client), pandas' own tests.
find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} + 2>/dev/null || true
rm -rf "$site"/torch/include "$site"/torch/share "$site"/torch/lib/*.a "$site"/torch/test \
       "$site"/pip "$site"/setuptools "$site"/wheel "$site"/*.dist-info/RECORD.jws \
       "$site"/kubernetes/aio "$site"/pandas/tests
find /opt/venv -name "*.pyc" -path "*/tests/*" -delete
