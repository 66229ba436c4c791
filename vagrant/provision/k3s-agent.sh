#!/usr/bin/env bash
# A worker: k3s agent, pinned to K3S_VERSION, joining the control plane over the private
# network with the lab's token.
set -euo pipefail

: "${NODE_NAME:?}" "${NODE_IP:?}" "${CN2M_K3S_VERSION:?}" "${CN2M_K3S_TOKEN:?}" "${CONTROL_PLANE_IP:?}"

log() { printf '[k3s-agent %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[k3s-agent %s] error: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }

[ "$CN2M_K3S_TOKEN" != "not-made-yet" ] || die "no join token: run vagrant up or provision from the vagrant/ folder"

iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" 'index($4, ip "/") == 1 {print $2; exit}')
[ -n "$iface" ] || die "no interface has $NODE_IP"

server="https://$CONTROL_PLANE_IP:6443"
log "waiting for the control plane at $server"
for _ in $(seq 1 90); do
  # Any HTTP answer (401 without credentials) means the API server listens.
  if curl -ks --max-time 3 -o /dev/null "$server/readyz"; then
    break
  fi
  sleep 2
done
curl -ks --max-time 3 -o /dev/null "$server/readyz" ||
  die "the control plane at $server does not answer: provision $CONTROL_PLANE_IP first (vagrant up brings it up first)"

mkdir -p /etc/rancher/k3s
cat >/etc/rancher/k3s/config.yaml <<EOF
server: $server
token: $CN2M_K3S_TOKEN
node-name: $NODE_NAME
node-ip: $NODE_IP
flannel-iface: $iface
EOF
chmod 600 /etc/rancher/k3s/config.yaml

if command -v k3s >/dev/null && k3s --version | grep -qF "k3s version $CN2M_K3S_VERSION "; then
  log "k3s $CN2M_K3S_VERSION is installed"
  systemctl restart k3s-agent
else
  log "installing k3s $CN2M_K3S_VERSION (agent)"
  curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION="$CN2M_K3S_VERSION" INSTALL_K3S_EXEC=agent sh -s -
fi
systemctl is-active --quiet k3s-agent || die "k3s-agent is not running: journalctl -u k3s-agent"
log "joined (kubectl get nodes on the control plane shows $NODE_NAME once it is Ready)"
