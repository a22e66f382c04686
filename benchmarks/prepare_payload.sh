#!/usr/bin/env bash
# Build benchmarks/payload/ for benchmarks/run_h200.sh: run it here, on a machine with the
# data and the project's environment, then copy the repository with the payload (about
# 20 MB) to the GPU machine. The payload contains
#   cifar10_train.npz  the bytes of 20,000 class-balanced CIFAR-10 training JPEGs (~18 MB)
#   settings.json      config/cpu.yaml's CIFAR-10 settings, so no YAML or jsonschema is needed there
#   site/              pure-Python packages the GPU machine may lack: lightly 1.6.0 and what
#                      its loss and transforms import, and tqdm (dcl.train imports it)
# Usage: DCL_DATA_ROOT=/path/to/data bash benchmarks/prepare_payload.sh
set -euo pipefail
root=${DCL_DATA_ROOT:?set DCL_DATA_ROOT to the folder that holds cifar10/}
python=${PYTHON:-.venv/bin/python}
payload=benchmarks/payload
rm -rf "$payload" && mkdir -p "$payload/wheels" "$payload/site"
PYTHONPATH=$PWD "$python" -m benchmarks.data pack --data-root "$root" \
    --out "$payload/cifar10_train.npz" --count "${COUNT:-20000}"
PYTHONPATH=$PWD "$python" -c "import json, sys; from dcl.config import load_study; \
json.dump(load_study('config/cpu.yaml')['datasets']['cifar10'], sys.stdout, indent=1)" \
    > "$payload/settings.json"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$payload/wheels" \
    lightly==1.6.0 lightning-utilities==0.15.3 packaging==25.0 tqdm==4.70.1
# Pure-Python wheels are zip files: unpacking them is an install without pip.
"$python" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    "$payload/site" "$payload"/wheels/*.whl
rm -rf "$payload/wheels"
du -sh "$payload"
