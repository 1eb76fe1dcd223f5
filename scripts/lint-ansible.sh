#!/usr/bin/env bash
# Lint the provisioning code: ansible-lint with the production profile (no skipped rules), a syntax check of
# the site playbook, and a check that every role default is declared in meta/argument_specs.yml and back.
# Usage: scripts/lint-ansible.sh        (installs ansible + ansible-lint into the repo venv when missing)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
venv="${INNOVA_VENV:-$repo_root/.venv}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
if [[ ! -x "$venv/bin/ansible-lint" || ! -x "$venv/bin/ansible-playbook" ]]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ansible ansible-lint
fi
export PATH="$venv/bin:$PATH"
export ANSIBLE_CONFIG="$repo_root/ansible.cfg"

ansible-playbook --syntax-check -i inventories/production playbooks/site.yml >/dev/null
ansible-playbook --syntax-check -i inventories/staging playbooks/site.yml >/dev/null

"$venv/bin/python" - <<'PY'
import pathlib, sys
import yaml
bad = []
for role in sorted(pathlib.Path("roles").glob("*/")):
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]
    declared = set(specs["main"]["options"])
    for name in defaults:
        if not name.startswith(role.name + "_"):
            bad.append(f"{role.name}: default {name} lacks the role prefix")
    for name in set(defaults) - declared:
        bad.append(f"{role.name}: default {name} missing from meta/argument_specs.yml")
    for name in declared - set(defaults):
        if not specs["main"]["options"][name].get("required"):
            bad.append(f"{role.name}: {name} declared in argument_specs but has no default")
if bad:
    sys.exit("\n".join(bad))
print("argument specs match the defaults")
PY

ansible-lint -c scripts/ansible-lint.yml playbooks roles inventories tests/molecule
