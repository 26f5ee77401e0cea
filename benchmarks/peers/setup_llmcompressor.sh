#!/usr/bin/env bash
# Create the llm-compressor peer virtual environment used by llmcompressor_runner.py.
#
# Usage: bash benchmarks/peers/setup_llmcompressor.sh [--force]
#
# The venv lives at benchmarks/peers/.venv-llmcompressor (git-ignored; LLMC_VENV overrides
# the path). llm-compressor is pinned to LLMC_VERSION (default 0.14.0.1; LLMC_VERSION=
# takes the newest release that resolves). Torch comes from a release that lies on local
# disk (2.13.0+cpu, then 2.13.0, then 2.14.1; TORCH_CANDIDATES overrides the list): the
# first one that llm-compressor's torch pin accepts is used, so pip never downloads a
# multi-GB CUDA build. The run is idempotent: a marker file records a finished install and
# later runs return at once unless --force is given.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LLMC_VENV:-${HERE}/.venv-llmcompressor}"
MARKER="${VENV}/.setup-complete"
LLMC_VERSION="${LLMC_VERSION-0.14.0.1}"
PYTHON="${PYTHON:-python3}"
# Torch releases available without a large download, in order of preference.
read -r -a TORCH_CANDIDATES <<<"${TORCH_CANDIDATES:-2.13.0+cpu 2.13.0 2.14.1}"

fail() {
    echo "setup_llmcompressor: FAILED: $*" >&2
    echo "setup_llmcompressor: the venv at ${VENV} is incomplete; rerun with --force." >&2
    exit 1
}

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "${VENV}"
elif [[ -f "${MARKER}" ]]; then
    echo "setup_llmcompressor: already set up ($(cat "${MARKER}"))"
    exit 0
fi

start=$(date +%s)
"${PYTHON}" -m venv "${VENV}" || fail "could not create a venv with ${PYTHON}"
# pip install, quiet, without the warnings about local index folders lacking a package.
pip_install() {
    "${VENV}/bin/python" -m pip --disable-pip-version-check install -q "$@" \
        2> >(grep -v "is neither a file nor a directory" >&2)
}
pip_install --upgrade pip || fail "could not upgrade pip in the venv"

if [[ -n "${LLMC_VERSION}" ]]; then
    llmc_req="llmcompressor==${LLMC_VERSION}"
else
    llmc_req="llmcompressor"
fi

# Pick the first local torch that llm-compressor's pins accept (pip --dry-run resolves
# without installing), then install both with torch held fixed by a constraints file.
constraints="$(mktemp)"
trap 'rm -f "${constraints}"' EXIT
installed=""
last_err=""
for tv in "${TORCH_CANDIDATES[@]}"; do
    echo "torch==${tv}" >"${constraints}"
    echo "setup_llmcompressor: resolving ${llmc_req} with torch==${tv}"
    if ! out="$("${VENV}/bin/python" -m pip --disable-pip-version-check install -q --dry-run \
        -c "${constraints}" "torch==${tv}" "${llmc_req}" 2>&1)"; then
        last_err="$(grep -v "is neither a file nor a directory" <<<"${out}" | tail -n 3)"
        echo "setup_llmcompressor: ${llmc_req} does not resolve with torch==${tv}"
        continue
    fi
    pip_install -c "${constraints}" "torch==${tv}" "${llmc_req}" ||
        fail "pip could not install torch==${tv} ${llmc_req}"
    installed="${tv}"
    break
done
if [[ -z "${installed}" ]]; then
    echo "${last_err}" >&2
    fail "no local torch (${TORCH_CANDIDATES[*]}) resolves with ${llmc_req}"
fi

"${VENV}/bin/python" - <<'PY' || fail "llmcompressor does not import"
import importlib.metadata as md

import llmcompressor  # noqa: F401

for name in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets"):
    print(f"setup_llmcompressor: {name}=={md.version(name)}")
PY

versions="$("${VENV}/bin/python" -c "import importlib.metadata as m; \
print(' '.join(f'{n}=={m.version(n)}' for n in ('llmcompressor', 'torch', 'transformers')))")"
echo "${versions}" >"${MARKER}"
echo "setup_llmcompressor: done in $(($(date +%s) - start)) s: ${versions}"
