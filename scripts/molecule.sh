#!/usr/bin/env bash
# Run the Molecule scenarios of the provisioning roles in podman containers that boot systemd.
#
#   scripts/molecule.sh                  # molecule test -s default
#   scripts/molecule.sh test default     # any molecule subcommand + scenario (converge, verify, login, destroy...)
#   scripts/molecule.sh converge default # keep the container for debugging; then `... destroy default`
#   scripts/molecule.sh converge default -- --check --diff   # extra arguments go to ansible-playbook
#   scripts/molecule.sh test production_shape   # the 3B-shaped model under the role's computed MemoryMax; needs
#                                               # `scripts/fetch_model.py llama32-3b-shape` once (cached)
#
# It prepares everything a fresh Debian 12 machine lacks, and caches what it can between runs:
#   1. apt: podman, runc, debootstrap (only when missing)
#   2. pip (into the repo venv .venv): molecule, molecule-plugins[podman], ansible, ansible-lint (only when missing)
#   3. the model file (scripts/fetch_model.py, only when missing)
#   4. the test image localhost/innova-debian12-systemd:<hash> (scripts/build-test-image.sh, reused when present)
#   5. the wheelhouse ~/.cache/innova-smollm/wheelhouse{,.tar} (scripts/build-wheelhouse.sh, rebuilt when service/ changes)
#   6. a python3 -m http.server on a free 127.0.0.1 port serving models/ for the role's download (stopped on exit)
# Env: INNOVA_TEST_PORT (the service port inside the host-networked container, default: a free one in 18400-18499);
#      for the fleet scenario INNOVA_FLEET_PORT_{1,2,3}, INNOVA_FLEET_LB_PORT, INNOVA_FLEET_METRICS_PORT (free ones in 18600-18699).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
action="${1:-test}"
scenario="${2:-default}"
log() { echo "molecule.sh: $*" >&2; }

# 1. System tools.
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi
export CONTAINERS_CONF="$repo_root/containers.conf"

# 2. Python tools in the repo venv.
venv="${INNOVA_VENV:-$repo_root/.venv}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c 'import molecule, molecule_plugins.podman, ansiblelint' 2>/dev/null \
   || [[ ! -x "$venv/bin/ansible-playbook" ]]; then
  log "installing molecule, molecule-plugins[podman], ansible, ansible-lint into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    molecule 'molecule-plugins[podman]' ansible ansible-lint
fi
export PATH="$venv/bin:$PATH"

# 3. The model the scenario deploys.
model="$repo_root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$model" ]]; then
  log "fetching the SmolLM2 model"
  "$venv/bin/python" scripts/fetch_model.py >&2
fi

# 4 + 5. Image and wheelhouse.
INNOVA_TEST_IMAGE="$(scripts/build-test-image.sh | tail -n 1)"
INNOVA_WHEELHOUSE="$(PYTHON="$venv/bin/python" scripts/build-wheelhouse.sh | tail -n 1)"
export INNOVA_TEST_IMAGE INNOVA_WHEELHOUSE

free_port() {  # a free TCP port on 127.0.0.1 in [$1, $2], or any free one
  "$venv/bin/python" - "$@" <<'PY'
import socket, sys
lo, hi = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (0, 0)
for port in (range(lo, hi + 1) if hi else [0]):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
else:
    sys.exit("no free port")
PY
}

# 6. Serve the model over loopback HTTP for the whole run.
http_port="$(free_port)"
"$venv/bin/python" -m http.server --bind 127.0.0.1 --directory "$repo_root/models" "$http_port" \
  >/tmp/innova-molecule-http.$$.log 2>&1 &
http_pid=$!
trap 'kill "$http_pid" 2>/dev/null || true; rm -f /tmp/innova-molecule-http.$$.log' EXIT
"$venv/bin/python" - "$http_port" <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
PY
export INNOVA_MODEL_URL="http://127.0.0.1:$http_port/SmolLM2-135M-Instruct.Q4_1.gguf" INNOVA_MODEL_FILE="$model"
export INNOVA_TEST_PORT="${INNOVA_TEST_PORT:-$(free_port 18400 18499)}"
if [[ "$scenario" == production_shape ]]; then
  # The production-shaped 3B model, copied from the controller's cache into the container (innova_model_src).
  # Building it takes about 17 minutes on 2 cores, so this run does not: it says how, and fails.
  shape="$("$venv/bin/python" - <<'PY'
import sys
sys.path.insert(0, "scripts")
import production_shape as ps
model = ps.cached_model(verify_sha256=False)
if model is None:
    sys.exit(
        f"molecule.sh: the production-shaped model is not cached in {ps.default_cache_dir()}: build it once with "
        "`.venv/bin/python scripts/fetch_model.py llama32-3b-shape` (about 17 minutes on 2 cores; later runs reuse it)"
    )
print(model, ps.read_record(model)["sha256"])
PY
)"
  export INNOVA_SHAPE_MODEL="${shape% *}" INNOVA_SHAPE_SHA256="${shape#* }"
  log "production-shaped model $INNOVA_SHAPE_MODEL (sha256 $INNOVA_SHAPE_SHA256)"
fi
if [[ "$scenario" == fleet ]]; then
  # Three backends, the balancer and its metrics listener, each on its own free loopback port.
  export INNOVA_FLEET_PORT_1="${INNOVA_FLEET_PORT_1:-$(free_port 18600 18619)}"
  export INNOVA_FLEET_PORT_2="${INNOVA_FLEET_PORT_2:-$(free_port 18620 18639)}"
  export INNOVA_FLEET_PORT_3="${INNOVA_FLEET_PORT_3:-$(free_port 18640 18659)}"
  export INNOVA_FLEET_LB_PORT="${INNOVA_FLEET_LB_PORT:-$(free_port 18660 18679)}"
  export INNOVA_FLEET_METRICS_PORT="${INNOVA_FLEET_METRICS_PORT:-$(free_port 18680 18699)}"
  log "fleet ports: backends $INNOVA_FLEET_PORT_1 $INNOVA_FLEET_PORT_2 $INNOVA_FLEET_PORT_3, balancer $INNOVA_FLEET_LB_PORT, metrics $INNOVA_FLEET_METRICS_PORT"
fi

log "image $INNOVA_TEST_IMAGE, wheelhouse $INNOVA_WHEELHOUSE, model $INNOVA_MODEL_URL, service port $INNOVA_TEST_PORT"
cd "$repo_root/tests"
export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}" PY_COLORS="${PY_COLORS:-0}"
molecule "$action" --scenario-name "$scenario" "${@:3}"
