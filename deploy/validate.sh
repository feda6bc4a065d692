#!/usr/bin/env bash
# Checks every shipped deployment file offline: the Kubernetes manifests against the API schemas
# (PyPI kubernetes-validate, strict: unknown fields are errors) and every shipped runneld
# config through `runneld --check`. Usage: deploy/validate.sh <path to runneld>
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
runneld=${1:?usage: deploy/validate.sh <path to runneld>}
manifests=("$here"/k8s/configmap.yaml "$here"/k8s/services.yaml "$here"/k8s/pdb.yaml "$here"/k8s/statefulset.yaml)

if ! command -v kubernetes-validate >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
# The oldest Kubernetes with GA gRPC probes (1.27) and the newest schemas shipped.
for v in 1.27.0 1.37.0; do
    kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}"
done
# The validator must catch a broken manifest, or the check above proves nothing.
broken=$(mktemp --suffix=.yaml)
trap 'rm -f "$broken"' EXIT
sed 's/replicas: 3/replicas: three/' "$here/k8s/statefulset.yaml" >"$broken"
if kubernetes-validate --strict --quiet "$broken" >/dev/null 2>&1; then
    echo "kubernetes-validate accepted a broken StatefulSet" >&2
    exit 1
fi
# Every file kustomization.yaml lists is validated above.
for f in $(sed -n 's/^  - //p' "$here/k8s/kustomization.yaml"); do
    [[ " ${manifests[*]} " == *" $here/k8s/$f "* ]] || { echo "k8s/$f is not validated" >&2; exit 1; }
done

# Shipped configs must pass the server's own validation.
python3 - "$here/k8s/configmap.yaml" >"${broken%.yaml}.toml" <<'PY'
import sys, yaml
print(yaml.safe_load(open(sys.argv[1]))["data"]["runneld.toml"])
PY
"$runneld" --check --config "${broken%.yaml}.toml" --node-id 2 >/dev/null
rm -f "${broken%.yaml}.toml"
RUNNEL_NODE_ID=1 "$runneld" --check --config "$here/docker/runneld.toml" >/dev/null
"$runneld" --check --config "$here/systemd/runneld.toml" >/dev/null
"$runneld" --check --config "$here/runneld.toml" >/dev/null
echo "deploy files valid: k8s manifests (1.27, 1.37), 4 runneld configs"
