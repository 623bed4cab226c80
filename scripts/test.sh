#!/usr/bin/env bash
# Runs every check and test of Trellis on a fresh Debian machine with the Rust toolchain.
# Needs root: the tests build network namespaces (all named tl-* or trt-*, all removed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh must run as root: the tests create network namespaces" >&2
  exit 1
fi

# A fresh machine builds everything once: incremental compilation would only add its
# bookkeeping to that build (it pays off on the next, which CI never has).
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL=0
fi

# The checks and the build need nothing the packages below bring: they run while the
# packages install (on a fresh machine each takes minutes), their output shown after.
build_log=$(mktemp /tmp/trt-build.XXXXXX)
(
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-run
  else
    cargo test --workspace --locked --no-run
  fi
) >"$build_log" 2>&1 &
build_pid=$!
trap 'pkill -P "$build_pid" 2>/dev/null || true; kill "$build_pid" 2>/dev/null || true; rm -f "$build_log"' EXIT

# Independent checkers and interop peers the tests use; the product itself needs none.
# podman (with runc, the CNI reference plugins, iptables for their portmap, jq for a test
# meta-plugin and busybox-static for a root filesystem) is the real runtime that calls
# trellis-cni in crates/cni-plugin/tests/runtime.rs.
packages=(iproute2 iputils-ping nftables conntrack wireguard-tools wireguard-go iperf3 etcd-server etcd-client openssl
  podman runc busybox-static containernetworking-plugins iptables jq)
# Debian's kubectl (kubernetes-client) is the real client crates/kube-double/tests/kubectl.rs
# points at the Kubernetes API double. Where another package owns /usr/bin/kubectl (the Google
# Cloud SDK's `kubectl`), Debian's is unpacked beside it instead and named by KUBECTL.
if dpkg-query -W -f='${Status}' kubectl 2>/dev/null | grep -q "install ok installed"; then
  kubectl_dir=/opt/trellis-test/kubernetes-client
  if [ ! -x "$kubectl_dir/usr/bin/kubectl" ]; then
    kubectl_deb=$(mktemp -d)
    chown _apt "$kubectl_deb" 2>/dev/null || true
    apt-get update -qq
    (cd "$kubectl_deb" && apt-get download -qq kubernetes-client)
    mkdir -p "$kubectl_dir"
    dpkg-deb -x "$kubectl_deb"/kubernetes-client_*.deb "$kubectl_dir"
    rm -rf "$kubectl_deb"
  fi
  export KUBECTL="$kubectl_dir/usr/bin/kubectl"
else
  packages+=(kubernetes-client)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Leftovers of an earlier test run that was killed would make tests fail for the wrong
# reason. Test labs are named t* (namespaces tl-t*); other labs, such as a benchmark
# running beside the tests, are left alone.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^(tl-t|trt-)' || true); do
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns delete "$ns" 2>/dev/null || true
done

if ! wait "$build_pid"; then
  cat "$build_log"
  echo "scripts/test.sh: format, lint or build failed (above)" >&2
  exit 1
fi
cat "$build_log"
# nextest runs the test binaries side by side, the labs one at a time (.config/nextest.toml);
# plain `cargo test` runs them one after the other, which takes minutes longer.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked
fi
