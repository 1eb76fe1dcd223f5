#!/usr/bin/env bash
# Build (or refresh) the wheelhouse the innova_backend role installs from: innova-smollm[server] and every
# dependency as wheels, so a host (or a test container) installs offline and needs no compiler.
#
# Cached outside git (default ~/.cache/innova-smollm/wheelhouse). Rebuilt only when needed:
#   - pyproject.toml or the build flags (llama-build-env.sh) changed -> all wheels (dependencies come from pip's own cache after the first time;
#                                llama-cpp-python compiles for ~4 min on 2 cores only when pip never built it)
#   - only service/ changed   -> just the innova_smollm wheel
# Besides DIR it writes DIR.tar (the wheels only, byte-for-byte reproducible): the innova_backend role's
# innova_backend_wheelhouse_archive. One file is copied to a host in one step and only when it changed.
# Usage: scripts/build-wheelhouse.sh [DIR]     # prints the archive path DIR.tar on stdout (last line)
# Env:   PYTHON (default: the repo's .venv python, else python3), INNOVA_WHEELHOUSE (default DIR).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheelhouse="${1:-${INNOVA_WHEELHOUSE:-$HOME/.cache/innova-smollm/wheelhouse}}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then python="$repo_root/.venv/bin/python"; else python=python3; fi
fi
mkdir -p "$wheelhouse"
# shellcheck source=scripts/llama-build-env.sh
source "$repo_root/scripts/llama-build-env.sh"

# The build flags count as a dependency: a wheel compiled with other flags (llama.cpp's AMX kernels) must go.
deps_key="$(cat "$repo_root/pyproject.toml" "$repo_root/scripts/llama-build-env.sh" | sha256sum | cut -c1-16)"
pkg_key="$(cd "$repo_root" && { cat pyproject.toml; find service -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
  | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)"

pip_wheel() {
  (cd "$repo_root" && PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip wheel --quiet "$@" -w "$wheelhouse") >&2
}

if [[ "$(cat "$wheelhouse/.deps-key" 2>/dev/null)" != "$deps_key" ]]; then
  echo "wheelhouse: building innova-smollm[server] and all dependencies into $wheelhouse" >&2
  # Every wheel goes: pip wheel keeps a file already in the folder, even one built with other flags; what is
  # unchanged comes back from pip's own cache in seconds.
  rm -f "$wheelhouse"/*.whl
  pip_wheel '.[server]'
  echo "$deps_key" >"$wheelhouse/.deps-key"
  echo "$pkg_key" >"$wheelhouse/.pkg-key"
elif [[ "$(cat "$wheelhouse/.pkg-key" 2>/dev/null)" != "$pkg_key" ]]; then
  echo "wheelhouse: service/ changed, rebuilding the innova_smollm wheel" >&2
  rm -f "$wheelhouse"/innova_smollm-*.whl
  pip_wheel --no-deps .
  echo "$pkg_key" >"$wheelhouse/.pkg-key"
else
  echo "wheelhouse: up to date ($wheelhouse)" >&2
fi
ls "$wheelhouse"/innova_smollm-*.whl >/dev/null
archive="${wheelhouse%/}.tar"
(cd "$wheelhouse" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=0644 \
  -cf "$archive.tmp" ./*.whl) && mv "$archive.tmp" "$archive"
echo "$archive"
