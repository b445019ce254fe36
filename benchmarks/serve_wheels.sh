#!/usr/bin/env bash
# Wheels of the [serve] extra and benchmarks/serve.py's client (fastapi, uvicorn, prometheus_client,
# httpx and what they need), pinned to the versions the tests ran with, for an offline GPU machine
# with Python 3.12. Usage: benchmarks/serve_wheels.sh [DEST]   (default: .whl)
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
# (a copy of pydantic there may be older than fastapi needs: the pinned one comes along.)
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dest" \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 prometheus-client==0.26.0 \
  httpx==0.28.1 httpcore==1.0.9 anyio==4.16.0 idna==3.20 certifi==2026.5.20 \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-extensions==4.16.0 \
  typing-inspection==0.4.2 annotated-doc==0.0.7 opentelemetry-api==1.45.2
du -sh "$dest"
