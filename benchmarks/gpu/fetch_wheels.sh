#!/usr/bin/env bash
# Download, here (with network), the wheels that the GPU machine lacks, into .whl/ at the repo root.
#
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]        (DEST defaults to .whl; .whl/ is git-ignored)
#
# The GPU machine has Python 3.12 with torch, torchvision, timm, onnx, onnxruntime (CPU), numpy, pillow, pytest and
# many common packages, but no network, no bentoml and no pydantic. This fetches cp312 manylinux wheels (or
# py3-none-any ones for pure-Python packages), without dependencies, of exactly the packages missing there:
# ltserve's pydantic stack and bentoml with its dependencies that the image does not carry. Versions come from
# constraints.txt (the versions the test suite passed with), so the GPU run serves with the same libraries.
# benchmarks/gpu_run.sh installs them there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=.venv/bin/python
mkdir -p "$DEST"

# name (as in constraints.txt)     why it is needed there
PACKAGES=(
  pydantic pydantic_core annotated-types typing-inspection typing_extensions   # ltserve's schemas
  pydantic-settings python-dotenv              # the service's settings (python-dotenv: a requirement of it)
  bentoml a2wsgi aiohttp-asgi-connector aiosqlite asgiref cattrs click-option-group   # bentoml and its imports
  httpx-ws kantoku pip-requirements-parser python-json-logger python-multipart
  pyzmq rich-toolkit schema simple-di starlette tomli_w tornado uvicorn watchfiles wsproto tzdata certifi
  opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-instrumentation
  opentelemetry-instrumentation-aiohttp-client opentelemetry-instrumentation-asgi opentelemetry-util-http
  onnxscript onnx-ir ml-dtypes                 # ltserve's exporter (torch.onnx dynamo), which builds the packages
)

version_of() {  # the pinned version of $1 in constraints.txt (names compared case- and -/_-insensitively)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  awk -F'==' -v w="$want" '{ n = tolower($1); gsub(/[_.]/, "-", n); if (n == w) { print $2; exit } }' constraints.txt
}

for name in "${PACKAGES[@]}"; do
  ver=$(version_of "$name")
  spec=$name${ver:+==$ver}
  [ -n "$ver" ] || echo "warning: $name is not pinned in constraints.txt; fetching the newest" >&2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
done

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024 / 1024)) MB in $DEST"
if [ "$total" -ge $((50 * 1024 * 1024)) ]; then
  echo "error: the wheels take more than 50 MB; they must travel with the working tree" >&2
  exit 1
fi
