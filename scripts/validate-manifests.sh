#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ without a cluster:
#
# - each overlay (deploy/overlays/*) rendered with `kubectl kustomize`, deploy/uninstall, and the CRDs in
#   deploy/crds, checked object by object against Kubernetes 1.33's own schemas with
#   kubernetes-validate --strict (an unknown field is an error, as `kubectl apply
#   --validate=strict` makes it); a kind it has no schema for is an error too, since none
#   of these objects is a custom resource;
# - custom resources given on the command line (the agent's Locations, Kilo's Peers)
#   checked against their CRD's openAPIV3Schema from deploy/crds, with the API server's
#   pruning made an error: a field the schema does not declare would be dropped silently.
#
# Usage: scripts/validate-manifests.sh [RESOURCE.json|yaml ...] [--invalid RESOURCE ...]
#   RESOURCE            a custom resource that must be accepted
#   --invalid RESOURCE  one that must be refused (shows the check can fail)
#
# Exit status: 0 all valid; 1 something invalid; 2 usage; 3 a tool could not be had (no
# kubectl whose kustomize reads these kustomizations, or the Python packages could not be
# installed): crates/kube/tests/manifests.rs skips on 3 outside CI and fails on it in CI.
#
# Tools: kubernetes-validate (PyPI, pinned below) in a venv at /opt/trellis-test/venv (or
# $TRELLIS_TEST_VENV), made on the first run and reused after (pip runs only when a pin
# changed); kubectl from $KUBECTL, PATH or /usr/bin, the
# first whose `kubectl kustomize` renders the overlays (Debian 12's kubectl 1.20 has
# kustomize 2.0.3, which cannot; kubectl 1.21 and later can). Everything else goes to a
# temporary directory /tmp/trt-manifests.* that is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.33.0
VENV=${TRELLIS_TEST_VENV:-/opt/trellis-test/venv}
# kubernetes-validate has schemas for Kubernetes 1.25-1.37; jsonschema and PyYAML are
# its dependencies, and the custom resource check below uses them directly.
PINS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4)

missing() {
  echo "validate-manifests: $*" >&2
  exit 3
}

valid=()
invalid=()
while [ $# -gt 0 ]; do
  case "$1" in
    --invalid)
      [ $# -ge 2 ] || { echo "usage: $0 [RESOURCE ...] [--invalid RESOURCE ...]" >&2; exit 2; }
      invalid+=("$2")
      shift 2
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d'
      exit 0
      ;;
    -*)
      echo "usage: $0 [RESOURCE ...] [--invalid RESOURCE ...]" >&2
      exit 2
      ;;
    *)
      valid+=("$1")
      shift
      ;;
  esac
done

# The venv: made once, its packages installed only when a pin changed. A lock keeps two
# runs (nextest runs test binaries side by side) from building it at the same time.
mkdir -p "$(dirname "$VENV")" 2>/dev/null || missing "cannot create $(dirname "$VENV")"
exec 9>"$VENV.lock" || missing "cannot write $VENV.lock"
flock 9
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2 || { rm -rf "$VENV"; missing "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)"; }
fi
installed=$("$VENV/bin/python" - "${PINS[@]}" <<'PY'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if metadata.version(name) != version:
            print(pin)
    except metadata.PackageNotFoundError:
        print(pin)
PY
)
if [ -n "$installed" ]; then
  echo "validate-manifests: installing ${PINS[*]} into $VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --timeout 30 --retries 2 "${PINS[@]}" >&2 ||
    missing "pip install ${PINS[*]} failed"
fi
flock -u 9

kubectl=""
tried=()
for candidate in "${KUBECTL:-}" kubectl /usr/bin/kubectl; do
  [ -n "$candidate" ] || continue
  command -v "$candidate" >/dev/null 2>&1 || continue
  tried+=("$candidate")
  if "$candidate" kustomize deploy/overlays/full >/dev/null 2>&1; then
    kubectl=$candidate
    break
  fi
done
[ -n "$kubectl" ] || missing "no kubectl renders deploy/overlays (tried: ${tried[*]:-none}); kubectl 1.21 or later is needed"

work=$(mktemp -d /tmp/trt-manifests.XXXXXX)
trap 'rm -rf "$work"' EXIT

failed=0
# Runs kubernetes-validate on FILE, which holds COUNT objects: every one must pass, and
# each must be a kind it knows.
check() {
  local file=$1 what=$2 count=$3 out passed
  if ! out=$("$VENV/bin/kubernetes-validate" --strict -k "$KUBERNETES_VERSION" "$file" 2>&1); then
    echo "$out" | grep -v '^INFO' >&2
    echo "FAIL $what" >&2
    failed=1
    return
  fi
  if echo "$out" | grep -q "Couldn't find schema"; then
    echo "$out" | grep "Couldn't find schema" >&2
    echo "FAIL $what: a kind Kubernetes $KUBERNETES_VERSION does not have" >&2
    failed=1
    return
  fi
  passed=$(echo "$out" | grep -c 'passed for resource' || true)
  if [ "$passed" -ne "$count" ]; then
    echo "$out" >&2
    echo "FAIL $what: $passed of $count objects validated" >&2
    failed=1
    return
  fi
  echo "ok   $what: $count objects valid for Kubernetes $KUBERNETES_VERSION"
}

for overlay in deploy/overlays/*/; do
  name=$(basename "$overlay")
  rendered="$work/$name.yaml"
  if ! "$kubectl" kustomize "$overlay" >"$rendered" 2>"$work/$name.err"; then
    cat "$work/$name.err" >&2
    echo "FAIL deploy/overlays/$name: kustomize cannot render it" >&2
    failed=1
    continue
  fi
  check "$rendered" "deploy/overlays/$name" "$(grep -c '^kind:' "$rendered")"
done
check deploy/uninstall/daemonset.yaml deploy/uninstall "$(grep -c '^kind:' deploy/uninstall/daemonset.yaml)"
for crd in deploy/crds/*.yaml; do
  [ "$(basename "$crd")" = kustomization.yaml ] && continue
  check "$crd" "$crd" "$(grep -c '^kind:' "$crd")"
done

# Custom resources against their CRD's schema, as the API server would judge them.
"$VENV/bin/python" - deploy/crds "${#valid[@]}" "${valid[@]}" "${invalid[@]}" <<'PY' || failed=1
import copy, json, pathlib, sys
import jsonschema, yaml

crd_dir, n_valid, *files = sys.argv[1:]
valid, invalid = files[: int(n_valid)], files[int(n_valid) :]

schemas = {}
for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
    for crd in yaml.safe_load_all(path.read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = (path.name, version["schema"]["openAPIV3Schema"])


def as_json_schema(node, root=False):
    """The openAPIV3Schema as JSON Schema draft 4, with pruning as an error: an object
    that declares its properties and neither additionalProperties nor
    x-kubernetes-preserve-unknown-fields admits no other field (the API server would drop
    it). metadata is the API server's to validate, as it does for every object."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description", "example"):
            continue
        if key == "properties":
            out[key] = {name: as_json_schema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = as_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = as_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if root:
        out.setdefault("required", [])
        for field in ("apiVersion", "kind", "metadata"):
            if field not in out["required"]:
                out["required"].append(field)
    return out


def errors(path):
    text = pathlib.Path(path).read_text()
    obj = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return [f"no CRD in {crd_dir} for {key[1]} {key[0]}"]
    crd_file, schema = schemas[key]
    found = []
    if not (obj.get("metadata") or {}).get("name"):
        found.append("metadata.name: required")
    validator = jsonschema.Draft4Validator(
        as_json_schema(schema, root=True), format_checker=jsonschema.FormatChecker()
    )
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "(object)"
        found.append(f"{where}: {e.message} (schema of {crd_file})")
    return found


bad = 0
for path in valid:
    found = errors(path)
    if found:
        bad = 1
        for e in found:
            print(f"FAIL {path}: {e}", file=sys.stderr)
    else:
        print(f"ok   {path}: accepted by its CRD")
for path in invalid:
    found = errors(path)
    if found:
        print(f"ok   {path}: refused as it should be ({found[0]})")
    else:
        bad = 1
        print(f"FAIL {path}: accepted, but it should be refused", file=sys.stderr)
sys.exit(bad)
PY

if [ "$failed" -ne 0 ]; then
  echo "validate-manifests: invalid manifests" >&2
  exit 1
fi
echo "validate-manifests: all valid (kubectl: $kubectl; $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -1))"
