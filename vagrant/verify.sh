#!/usr/bin/env bash
# End-to-end check of the VM lab, run on the Vagrant host after `vagrant up`:
#
#   1. applies vagrant/manifests/*.yaml: the workloads (again, unchanged) and three
#      mirroring policies, one per analyzer placement:
#        same-node   client->web HTTP, mirrored at web (cn2m-w1) to analyzer1 on cn2m-w1
#        other-node  client->web ping, mirrored at web (cn2m-w1) to analyzer2 on cn2m-cp
#        external    client->web HTTP, mirrored at client (cn2m-w2) to this host (HOST_IP)
#   2. computes the jmirror ids the copies must carry with the project's own compiler,
#      run on the control plane over the live objects (lib/expected_ids.py);
#   3. captures UDP 30030 with tshark in analyzer1, in analyzer2 and on this host's
#      private-network interface, while the client and a bystander (same traffic, never
#      selected) each send HTTP requests and pings to web;
#   4. asks the agent on each mirroring node whether it knows the same ids
#      (`cn2mirror ids --mirror-id M --session-id S`);
#   5. judges the captures (lib/check_capture.py): right ids, right analyzer, only the
#      selected flows, both directions, nothing from the bystander. Prints a PASS table;
#      exits non-zero with the failed checks otherwise.
#
# Usage: vagrant/verify.sh [--delete]     (--delete: remove the mirroring policies after)
# Environment: TSHARK (default tshark; e.g. "sudo tshark" if you may not capture),
#   ROUNDS (traffic rounds, 10), DURATION (seconds each capture runs, 45),
#   SETTLE (seconds the agents get to apply the policies, 15), OUT (vagrant/out).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
CP=cn2m-cp
NODES=(cn2m-cp cn2m-w1 cn2m-w2)
AGENT_NS=cn2mirror-system
PORT=30030
ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-45}
SETTLE=${SETTLE:-15}
OUT=${OUT:-$HERE/out}
read -r -a TSHARK_CMD <<<"${TSHARK:-tshark}"
DELETE=false

case "${1:-}" in
  "") ;;
  --delete) DELETE=true ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--delete]" >&2; exit 2 ;;
esac

log() { printf 'verify: %s\n' "$*"; }
die() { printf '\nverify: FAIL: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is not installed on this host ($2)"; }

need vagrant "the VMs are driven with it"
need ssh "kubectl runs on the control plane over ssh"
need python3 "the checks are Python, standard library only"
need ip "iproute2 finds the host's private-network interface"
need "${TSHARK_CMD[-1]}" "the external analyzer: apt install tshark"

mkdir -p "$OUT"
rm -f "$OUT"/*.tsv "$OUT"/*.err "$OUT"/*.json "$OUT"/result.txt

# One `vagrant ssh-config` up front; plain ssh afterwards is quick.
vagrant ssh-config "${NODES[@]}" >"$OUT/ssh-config" 2>"$OUT/vagrant.err" ||
  die "vagrant ssh-config failed (are the VMs up? vagrant status): $(cat "$OUT/vagrant.err")"
on() {
  local host=$1
  shift
  ssh -F "$OUT/ssh-config" -o LogLevel=ERROR -o BatchMode=yes "$host" -- "$(printf '%q ' "$@")"
}
kc() { on "$CP" sudo k3s kubectl "$@"; }

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

diagnose() {
  {
    echo "--- kubectl get nodes,pods -A -o wide"
    kc get nodes -o wide || true
    kc get pods -A -o wide || true
    echo "--- agent logs (last 30 lines per pod)"
    local p
    for p in $(kc -n "$AGENT_NS" get pods -o name 2>/dev/null); do
      kc -n "$AGENT_NS" logs "$p" --all-containers --prefix --tail=30 || true
    done
  } >&2
}

# --- 1. The cluster and the objects ---------------------------------------------------------

log "waiting for the nodes: ${NODES[*]}"
for n in "${NODES[@]}"; do
  kc wait --for=condition=Ready "node/$n" --timeout=300s >/dev/null ||
    { diagnose; die "node $n is not Ready (vagrant up finished? vagrant provision $n)"; }
done

mapfile -t daemonsets < <(kc -n "$AGENT_NS" get daemonsets -o name)
[ ${#daemonsets[@]} -gt 0 ] ||
  die "no DaemonSet in namespace $AGENT_NS: the agent is not deployed (vagrant provision $CP --provision-with deploy)"
for ds in "${daemonsets[@]}"; do
  log "waiting for the agent: $ds"
  kc -n "$AGENT_NS" rollout status "$ds" --timeout=300s >/dev/null ||
    { diagnose; die "$ds is not ready on every node"; }
done

for f in "$HERE"/manifests/*.yaml; do
  log "kubectl apply -f manifests/$(basename "$f")"
  kc apply -f - <"$f" >/dev/null || die "kubectl apply -f manifests/$(basename "$f") failed"
done
kc -n lab wait --for=condition=Ready pod --all --timeout=300s >/dev/null ||
  { diagnose; die "the lab's pods are not Ready (images built? vagrant provision --provision-with images)"; }

# The external analyzer is this host, at HOST_IP on the private network.
HOST_IP=$(on "$CP" cat /etc/cn2mirror-lab.env | sed -n 's/^HOST_IP=//p')
[ -n "$HOST_IP" ] || die "no HOST_IP in $CP:/etc/cn2mirror-lab.env (provisioned with this Vagrantfile?)"
grep -Eq "^[[:space:]]*analyzerIP:[[:space:]]*${HOST_IP//./\\.}[[:space:]]*\$" manifests/mirror-external.yaml ||
  die "manifests/mirror-external.yaml's analyzerIP is not HOST_IP $HOST_IP: make them agree"
HOST_IFACE=$(ip -o -4 addr show | awk -v ip="$HOST_IP" 'index($4, ip "/") == 1 {print $2; exit}')
[ -n "$HOST_IFACE" ] ||
  die "no interface of this host has $HOST_IP (VirtualBox: vboxnet0; libvirt: the network's bridge)"
log "external analyzer: this host, $HOST_IP on $HOST_IFACE"
"${TSHARK_CMD[@]}" -i "$HOST_IFACE" -a duration:1 -q -f "udp dst port $PORT" >/dev/null 2>"$OUT/tshark-check.err" ||
  die "tshark cannot capture on $HOST_IFACE: $(tail -n 2 "$OUT/tshark-check.err") (join group wireshark, or TSHARK=\"sudo tshark\")"

log "giving the agents ${SETTLE}s to apply the policies"
sleep "$SETTLE"

# --- 2. The ids the copies must carry -------------------------------------------------------

log "expected ids: the project's compiler over the live objects, on $CP"
on "$CP" sudo python3 /vagrant/vagrant/lib/expected_ids.py --kubectl "k3s kubectl" >"$OUT/ids.json" ||
  die "lib/expected_ids.py failed on $CP"
kc -n lab get pods -o json >"$OUT/pods.json"
WEB_IP=$(kc -n lab get pod web -o jsonpath='{.status.podIP}')
[ -n "$WEB_IP" ] || die "pod lab/web has no IP"

# --- 3. Capture while the traffic runs -----------------------------------------------------

TSHARK_ARGS=(-n -p -l -a "duration:$DURATION" -f "udp dst port $PORT" -d "udp.port==$PORT,jmirror"
  -T fields -E separator=/t)
for field in jmirror.mid jmirror.sid ip.src ip.dst ip.proto tcp.srcport tcp.dstport; do
  TSHARK_ARGS+=(-e "$field")
done

log "capturing for ${DURATION}s: analyzer1 (same node), analyzer2 (other node), this host (external)"
kc -n lab exec analyzer1 -- tshark -i eth0 "${TSHARK_ARGS[@]}" >"$OUT/same-node.tsv" 2>"$OUT/same-node.err" </dev/null &
pids+=("$!")
kc -n lab exec analyzer2 -- tshark -i eth0 "${TSHARK_ARGS[@]}" >"$OUT/other-node.tsv" 2>"$OUT/other-node.err" </dev/null &
pids+=("$!")
"${TSHARK_CMD[@]}" -i "$HOST_IFACE" "${TSHARK_ARGS[@]}" >"$OUT/external.tsv" 2>"$OUT/external.err" </dev/null &
pids+=("$!")
started=$SECONDS

for name in same-node other-node external; do
  for _ in $(seq 1 30); do
    grep -q "Capturing on" "$OUT/$name.err" 2>/dev/null && break
    sleep 0.5
  done
  grep -q "Capturing on" "$OUT/$name.err" || die "the $name capture did not start: $(cat "$OUT/$name.err")"
done

# Each round: one HTTP GET and one ping to web's pod IP, new flows every time.
# shellcheck disable=SC2016  # $1 and $2 are expanded by the pod's shell, not this one
LOOP='ok=0; pg=0; i=0
while [ "$i" -lt "$2" ]; do
  wget -q -T 3 -O /dev/null "http://$1/" && ok=$((ok + 1))
  ping -c 1 -W 2 "$1" >/dev/null 2>&1 && pg=$((pg + 1))
  i=$((i + 1)); sleep 1
done
echo "$ok/$pg/$2"'
log "traffic: $ROUNDS rounds of HTTP + ping to web ($WEB_IP) from client (selected) and bystander (not)"
kc -n lab exec client -- sh -c "$LOOP" sh "$WEB_IP" "$ROUNDS" >"$OUT/traffic-client.txt" </dev/null &
client_pid=$!
kc -n lab exec bystander -- sh -c "$LOOP" sh "$WEB_IP" "$ROUNDS" >"$OUT/traffic-bystander.txt" </dev/null ||
  die "the bystander's traffic loop failed"
wait "$client_pid" || die "the client's traffic loop failed"
if [ $((SECONDS - started)) -ge "$DURATION" ]; then
  die "the traffic took longer than the capture (${DURATION}s): raise DURATION"
fi

for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || die "a capture failed: $(cat "$OUT"/*.err)"
done
pids=()

# --- 4. Does each mirroring node's agent know the same ids? -----------------------------------
# `cn2mirror ids --mirror-id M --session-id S` in the agent pod on the node of the mirrored
# pod answers from the ids the agent itself programmed: it fails with "not known" when
# they differ from the compiler's. An image without the command counts as n/a.

agent_args=()
while read -r name node mid sid; do
  # </dev/null: ssh would otherwise read the loop's own input.
  pod=$(kc -n "$AGENT_NS" get pods --field-selector "spec.nodeName=$node" -o name </dev/null |
    head -n 1)
  result=unavailable
  if [ -n "$pod" ]; then
    if kc -n "$AGENT_NS" exec "$pod" -- cn2mirror ids --mirror-id "$mid" --session-id "$sid" \
      -o json >"$OUT/agent-ids-$name.txt" 2>&1 </dev/null; then
      result=agrees
    elif grep -q "not known" "$OUT/agent-ids-$name.txt"; then
      result=disagrees
    fi
  fi
  agent_args+=(--agent "$name=$result")
done < <(python3 "$HERE/lib/check_capture.py" --ids "$OUT/ids.json" --pods "$OUT/pods.json" --expected)

# --- 5. Judge ---------------------------------------------------------------------------------

log "results (raw data in $OUT)"
echo
set +e
python3 "$HERE/lib/check_capture.py" --ids "$OUT/ids.json" --pods "$OUT/pods.json" \
  --capture "same-node=$OUT/same-node.tsv" --capture "other-node=$OUT/other-node.tsv" \
  --capture "external=$OUT/external.tsv" \
  --traffic "client=$(cat "$OUT/traffic-client.txt")" \
  --traffic "bystander=$(cat "$OUT/traffic-bystander.txt")" "${agent_args[@]}" | tee "$OUT/result.txt"
status=${PIPESTATUS[0]}
set -e

if $DELETE; then
  for f in "$HERE"/manifests/mirror-*.yaml; do kc delete -f - <"$f" >/dev/null || true; done
  log "mirroring policies deleted"
fi
if [ "$status" -ne 0 ]; then
  diagnose
  die "see the failed checks above; captures and ids are in $OUT"
fi
log "PASS"
