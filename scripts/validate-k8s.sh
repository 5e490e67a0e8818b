#!/usr/bin/env bash
# Validates every manifest under deploy/kubernetes/ offline: against the Kubernetes JSON schemas
# bundled in kubernetes-validate (strict: unknown fields are errors), for each Kubernetes version
# in K8S_VERSIONS, then against the deployment rules of scripts/k8s-policy.py. Installs its
# validator itself into a virtualenv (PyPI is the only network access). Exits non-zero on any
# invalid manifest. Usage: validate-k8s.sh [DIR] (default deploy/kubernetes).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
venv=${K8S_VALIDATE_VENV:-target/k8s-validate-venv}

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "python3 with venv not found: installing Debian's" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
if ! "$venv/bin/pip" show -q kubernetes-validate >/dev/null 2>&1 ||
    [ "$("$venv/bin/pip" show kubernetes-validate | sed -n 's/^Version: //p')" != "${KUBERNETES_VALIDATE#*==}" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi

shopt -s nullglob
dir=${1:-deploy/kubernetes}
manifests=("$dir"/*.yaml)
[ "${#manifests[@]}" -gt 0 ] || { echo "no manifests under $dir" >&2; exit 1; }

for version in $K8S_VERSIONS; do
    echo "-- Kubernetes $version schemas (strict)"
    "$venv/bin/kubernetes-validate" --strict -k "$version" "${manifests[@]}"
done
echo "-- deployment rules"
"$venv/bin/python" scripts/k8s-policy.py "${manifests[@]}"
