#!/usr/bin/env bash
# `make gpu-check`: find a Python that has gram-ray's dependencies, then run scripts/gpu_check.py with it.
#   - the project's .venv (`make install`) when there is one;
#   - else, on a bare GPU machine (torch, transformers, pyarrow, but no Ray, no network), the .gpu/ bundle that
#     `make gpu-bundle` builds: Ray and its missing wheels unpacked to a scratch site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
elif [[ -f .gpu/ray-slim.tar.xz ]]; then
  site=${GRAM_RAY_SITE:-/tmp/gram-ray-site}
  echo "setting up Ray from .gpu/ into $site ..."
  mkdir -p "$site"
  tar -xJf .gpu/ray-slim.tar.xz -C "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python=python3
else
  echo "no .venv and no .gpu/ bundle: run 'make install' first (or 'make gpu-bundle' for a bare GPU machine)" >&2
  exit 2
fi
# W&B is not in the bundle, and a check never logs to an account.
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec "$python" scripts/gpu_check.py "$@"
