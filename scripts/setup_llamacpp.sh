#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU) for benchmarks/serve.py's llama.cpp row.
#
# llama.cpp itself is not on PyPI; the `llama-cpp-python` sdist vendors it. pip downloads
# that sdist (never installed), and cmake builds only the vendored server target:
#     build/llamacpp/bin/llama-server
# No network access beyond pip's: the server's web UI (prebuilt or built with npm) and
# OpenSSL/curl are off. JOBS (default 2) and NICE (default 19) share a busy machine.
# Takes ~10-20 min on 2 cores. Rerunning reuses the sdist and the cmake build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
WORK=build/llamacpp
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$WORK"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$WORK"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
nice -n "$NICE" cmake -S "$SRC" -B "$WORK/cmake" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    >"$WORK/cmake.log"
nice -n "$NICE" cmake --build "$WORK/cmake" --target llama-server -j "$JOBS" >"$WORK/build.log"
mkdir -p "$WORK/bin"
cp "$WORK/cmake/bin/llama-server" "$WORK/bin/llama-server"
"$WORK/bin/llama-server" --version 2>&1 | head -2
echo "built $WORK/bin/llama-server"
