#!/usr/bin/env bash
# Mesh benchmarks (issues 2 and 13): time from `lab up` to full connectivity, and pod-to-pod
# throughput, whole-machine CPU per gigabit and ping under load through Trellis beside
# Debian's wireguard-go on the same kind of veth and a plain veth, measured in the same run.
# Needs root, iperf3, wireguard-go and wg. Prints a Markdown report.
#
#   ./scripts/bench.sh [--trials 5] [--seconds 5] [--repeats 3] [--throughput-only]
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
    --throughput-only) trials=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

cargo build --release -q -p trellis
T=./target/release/trellis
export TRELLIS_LOG=warn

cleanup() {
  for l in tbcv tbtp tbt2 tbo2 tbop; do $T lab down --name $l >/dev/null 2>&1 || true; done
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
if [ "$trials" -gt 0 ]; then
echo "### Time from \`lab up\` to full connectivity"
echo
echo "| nodes | locations | trial times (s) | median (s) |"
echo "|---|---|---|---|"
fi
for shape in "6 2" "24 4"; do
  [ "$trials" -gt 0 ] || break
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

# Busy jiffies of the whole machine (every CPU, user and kernel, softirq included).
busy_jiffies() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }

# One measured path: $repeats iperf3 runs of $seconds s with STREAMS streams, each beside a
# ping every 0.1 s between the same two namespaces. Prints
# "MEDIAN_MBITS|RUNS|CPU_S_PER_GBIT|PING_P50_MS|PING_P99_MS".
measure() { # SERVER_NETNS CLIENT_NETNS SERVER_IP STREAMS [RATE]
  local runs="" cpu_total=0 bits_total=0 pings=()
  for _ in $(seq "$repeats"); do
    ip netns exec "$1" iperf3 -s -D -1 >/dev/null
    sleep 0.3
    local pingfile; pingfile=$(mktemp /tmp/tl-bench-ping.XXXXXX)
    ip netns exec "$2" ping -i 0.1 -w "$seconds" "$3" >"$pingfile" 2>/dev/null &
    local ping_pid=$! before; before=$(busy_jiffies)
    local mbits
    mbits=$(ip netns exec "$2" iperf3 -c "$3" -t "$seconds" -P "$4" ${5:+-b "$5"} -f m 2>/dev/null | awk '/receiver/ {v=$(NF-2)} END {print v}')
    local after; after=$(busy_jiffies)
    wait "$ping_pid" || true
    runs+="$mbits "
    cpu_total=$((cpu_total + after - before))
    bits_total=$(awk -v t="$bits_total" -v m="$mbits" -v s="$seconds" 'BEGIN{printf "%.3f", t + m * s / 1000}')
    while read -r ms; do pings+=("$ms"); done < <(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' "$pingfile")
    rm -f "$pingfile"
  done
  local sorted_pings; sorted_pings=$(printf '%s\n' "${pings[@]}" | sort -n)
  local p50 p99
  p50=$(echo "$sorted_pings" | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  p99=$(echo "$sorted_pings" | awk '{a[NR]=$1} END{i=int(NR*0.99); if (i<1) i=1; print a[i]}')
  local cpu_per_gbit
  cpu_per_gbit=$(awk -v j="$cpu_total" -v g="$bits_total" -v hz="$(getconf CLK_TCK)" 'BEGIN{ if (g > 0) printf "%.2f", j / hz / g; else print "n/a" }')
  # shellcheck disable=SC2086
  echo "$(median $runs)|${runs% }|$cpu_per_gbit|$p50|$p99"
}

# The address of a lab pod (its first IPv4 address on eth0).
pod_ip() { ip -n "$1" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1 | head -1; }

declare -A result
# measure_all KEY SERVER_NETNS CLIENT_NETNS SERVER_IP: one stream and four, and one stream
# paced to $paced (a load every path carries, so the ping compares the paths, not the load).
paced=500M
measure_all() {
  result[$1,1]=$(measure "$2" "$3" "$4" 1)
  result[$1,4]=$(measure "$2" "$3" "$4" 4)
  result[$1,paced]=$(measure "$2" "$3" "$4" 1 "$paced")
}

# Plain veth and wireguard-go on a veth: the reference points.
ip netns add tl-bve-1; ip netns add tl-bve-2
ip -n tl-bve-1 link add eth0 type veth peer name eth0 netns tl-bve-2
ip -n tl-bve-1 addr add 198.19.0.1/24 dev eth0; ip -n tl-bve-2 addr add 198.19.0.2/24 dev eth0
ip -n tl-bve-1 link set eth0 up; ip -n tl-bve-2 link set eth0 up
measure_all veth tl-bve-2 tl-bve-1 198.19.0.2

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
measure_all wggo tl-bwg-2 tl-bwg-1 10.9.0.2

# Trellis: two nodes, one tunnel over the location network (the same shape as above), with
# the offloads and without them.
$T lab up --name tbt2 --nodes 2 --locations 1 --granularity full >/dev/null
measure_all direct tl-tbt2-a2-p0 tl-tbt2-a1-p0 "$(pod_ip tl-tbt2-a2-p0)"
$T lab down --name tbt2 >/dev/null
TRELLIS_USERSPACE_OFFLOADS=off $T lab up --name tbo2 --nodes 2 --locations 1 --granularity full >/dev/null
measure_all direct_off tl-tbo2-a2-p0 tl-tbo2-a1-p0 "$(pod_ip tl-tbo2-a2-p0)"
$T lab down --name tbo2 >/dev/null

# Trellis across locations: pod a2 -> gateway a1 -> tunnel -> gateway b1 -> pod b2.
$T lab up --name tbtp --nodes 6 --locations 2 >/dev/null
measure_all cross tl-tbtp-b2-p0 tl-tbtp-a2-p0 "$(pod_ip tl-tbtp-b2-p0)"
$T lab down --name tbtp >/dev/null
TRELLIS_USERSPACE_OFFLOADS=off $T lab up --name tbop --nodes 6 --locations 2 >/dev/null
measure_all cross_off tl-tbop-b2-p0 tl-tbop-a2-p0 "$(pod_ip tl-tbop-b2-p0)"
$T lab down --name tbop >/dev/null

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print "n/a" }'; }
field() { echo "$1" | cut -d'|' -f"$2"; }
paths=(veth wggo direct direct_off cross cross_off)
label() {
  case $1 in
    veth) echo "plain veth, no tunnel (upper bound)" ;;
    wggo) echo "Debian wireguard-go ↔ wireguard-go on one veth" ;;
    direct) echo "Trellis, pod → pod, one tunnel between two nodes (\`full\`)" ;;
    direct_off) echo "Trellis, two nodes, offloads off" ;;
    cross) echo "Trellis, pod → pod across locations via two gateways" ;;
    cross_off) echo "Trellis, across locations, offloads off" ;;
  esac
}
echo
echo "### Pod-to-pod throughput (iperf3, TCP, ${seconds} s, median of ${repeats}), CPU and ping under load"
echo
echo "CPU: busy seconds of the whole machine (iperf3, kernel and tunnel together) per gigabit"
echo "moved. Ping: RTT between the same two namespaces, one every 0.1 s during the runs."
echo
echo "| path | streams | Mbit/s (median) | runs | vs wireguard-go | CPU s/Gbit | ping p50 ms | ping p99 ms |"
echo "|---|---|---|---|---|---|---|---|"
for key in "${paths[@]}"; do
  for streams in 1 4; do
    r=${result[$key,$streams]}; base=${result[wggo,$streams]}
    echo "| $(label "$key") | $streams | $(field "$r" 1) | $(field "$r" 2) | $(ratio "$(field "$r" 1)" "$(field "$base" 1)") | $(field "$r" 3) | $(field "$r" 4) | $(field "$r" 5) |"
  done
done
echo
echo "### Ping under an equal load (one stream paced to ${paced}bit/s, ${seconds} s, ${repeats} runs)"
echo
echo "| path | Mbit/s (median) | CPU s/Gbit | ping p50 ms | ping p99 ms |"
echo "|---|---|---|---|---|"
for key in "${paths[@]}"; do
  r=${result[$key,paced]}
  echo "| $(label "$key") | $(field "$r" 1) | $(field "$r" 3) | $(field "$r" 4) | $(field "$r" 5) |"
done
