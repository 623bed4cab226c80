#!/usr/bin/env bash
# Mesh benchmarks (issue 2): time from `lab up` to full connectivity, and pod-to-pod
# throughput through Trellis beside Debian's wireguard-go on the same kind of veth, measured
# in the same run. Needs root, iperf3, wireguard-go and wg. Prints a Markdown report.
#
#   ./scripts/bench.sh [--trials 5] [--seconds 5] [--repeats 3]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=5
seconds=5
repeats=3
while [ $# -gt 0 ]; do
  case "$1" in
    --trials) trials=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

cargo build --release -q -p trellis
T=./target/release/trellis
export TRELLIS_LOG=warn

cleanup() {
  for l in tbcv tbtp tbt2; do $T lab down --name $l >/dev/null 2>&1 || true; done
  for ns in tl-bwg-1 tl-bwg-2 tl-bve-1 tl-bve-2; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns delete $ns 2>/dev/null || true
  done
  rm -f /var/run/wireguard/tl-bwg-*.sock
}
trap cleanup EXIT
cleanup

now_ms() { date +%s%3N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

echo "## Benchmarks, $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r)"
echo
echo "### Time from \`lab up\` to full connectivity"
echo
echo "| nodes | locations | trial times (s) | median (s) |"
echo "|---|---|---|---|"
for shape in "6 2" "24 4"; do
  set -- $shape
  times=()
  for _ in $(seq "$trials"); do
    start=$(now_ms)
    $T lab up --name tbcv --nodes "$1" --locations "$2" >/dev/null
    until $T lab check --name tbcv --attempts 1 >/dev/null; do :; done
    end=$(now_ms)
    times+=("$(awk -v d=$((end - start)) 'BEGIN{printf "%.2f", d/1000}')")
    $T lab down --name tbcv >/dev/null
  done
  echo "| $1 | $2 | ${times[*]} | $(median "${times[@]}") |"
done

# $repeats iperf3 runs, Mbit/s each, space-separated.
iperf_runs() { # SERVER_NETNS CLIENT_NETNS SERVER_IP
  for _ in $(seq "$repeats"); do
    ip netns exec "$1" iperf3 -s -D -1 >/dev/null
    sleep 0.3
    ip netns exec "$2" iperf3 -c "$3" -t "$seconds" -f m 2>/dev/null | awk '/receiver/ {printf "%s ", $(NF-2)}'
  done
}

# Plain veth and wireguard-go on a veth: the reference points.
ip netns add tl-bve-1; ip netns add tl-bve-2
ip -n tl-bve-1 link add eth0 type veth peer name eth0 netns tl-bve-2
ip -n tl-bve-1 addr add 198.19.0.1/24 dev eth0; ip -n tl-bve-2 addr add 198.19.0.2/24 dev eth0
ip -n tl-bve-1 link set eth0 up; ip -n tl-bve-2 link set eth0 up
veth_runs=$(iperf_runs tl-bve-2 tl-bve-1 198.19.0.2); veth=$(median $veth_runs)

ip netns add tl-bwg-1; ip netns add tl-bwg-2
ip -n tl-bwg-1 link add eth0 type veth peer name eth0 netns tl-bwg-2
ip -n tl-bwg-1 addr add 198.19.1.1/24 dev eth0; ip -n tl-bwg-2 addr add 198.19.1.2/24 dev eth0
ip -n tl-bwg-1 link set eth0 up; ip -n tl-bwg-2 link set eth0 up
k1=$(wg genkey); k2=$(wg genkey)
for i in 1 2; do ip netns exec tl-bwg-$i wireguard-go tl-bwg-$i >/dev/null 2>&1; done
ip netns exec tl-bwg-1 wg set tl-bwg-1 private-key <(echo "$k1") listen-port 51820 \
  peer "$(echo "$k2" | wg pubkey)" endpoint 198.19.1.2:51820 allowed-ips 10.9.0.2/32
ip netns exec tl-bwg-2 wg set tl-bwg-2 private-key <(echo "$k2") listen-port 51820 \
  peer "$(echo "$k1" | wg pubkey)" endpoint 198.19.1.1:51820 allowed-ips 10.9.0.1/32
for i in 1 2; do
  ip -n tl-bwg-$i addr add 10.9.0.$i/24 dev tl-bwg-$i; ip -n tl-bwg-$i link set tl-bwg-$i mtu 1420 up
done
wggo_runs=$(iperf_runs tl-bwg-2 tl-bwg-1 10.9.0.2); wggo=$(median $wggo_runs)

# Trellis: two nodes, one tunnel over the location network (the same shape as above).
$T lab up --name tbt2 --nodes 2 --locations 1 --granularity full >/dev/null
direct_runs=$(iperf_runs tl-tbt2-a2-p0 tl-tbt2-a1-p0 10.244.1.10); trellis_direct=$(median $direct_runs)
$T lab down --name tbt2 >/dev/null

# Trellis across locations: pod a2 -> gateway a1 -> tunnel -> gateway b1 -> pod b2.
$T lab up --name tbtp --nodes 6 --locations 2 >/dev/null
cross_runs=$(iperf_runs tl-tbtp-b2-p0 tl-tbtp-a2-p0 10.244.4.10); trellis_cross=$(median $cross_runs)
$T lab down --name tbtp >/dev/null

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print "n/a" }'; }
echo
echo "### Pod-to-pod throughput (iperf3, TCP, one stream, ${seconds} s, median of ${repeats})"
echo
echo "| path | Mbit/s (median) | runs | vs wireguard-go |"
echo "|---|---|---|---|"
echo "| plain veth, no tunnel (upper bound) | $veth | $veth_runs | $(ratio "$veth" "$wggo") |"
echo "| Debian wireguard-go ↔ wireguard-go on one veth | $wggo | $wggo_runs | 1.00 |"
echo "| Trellis, pod → pod, one tunnel between two nodes of a location (\`full\`) | $trellis_direct | $direct_runs | $(ratio "$trellis_direct" "$wggo") |"
echo "| Trellis, pod → pod across locations via two gateways (\`location\`) | $trellis_cross | $cross_runs | $(ratio "$trellis_cross" "$wggo") |"
