#!/usr/bin/env bash
# The control plane, last: the CRDs, the agent (manifests/deploy, with the image built on
# the nodes), and the lab's workloads. Does not wait for the workers: they join after this
# runs (Vagrant brings the machines up in order) and the DaemonSet and the pinned pods
# start there as they do. verify.sh waits for everything to be Ready.
set -euo pipefail

: "${NODE_NAME:?}" "${AGENT_IMAGE:?}"
REPO=/vagrant
CRDS="$REPO/manifests/crds"
DEPLOY="$REPO/manifests/deploy"
WORKLOADS="$REPO/vagrant/manifests/00-lab-workloads.yaml"

log() { printf '[deploy %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[deploy %s] error: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }
kubectl() { k3s kubectl "$@"; }

[ -d "$CRDS" ] || die "no $CRDS"
[ -f "$DEPLOY/kustomization.yaml" ] || die "no $DEPLOY/kustomization.yaml: the agent's deployment is missing from the repository"

# Both API groups: the lab's external analyzer is written in CN2's (core.contrail.juniper.net).
log "CRDs (both API groups)"
mapfile -t crds < <(kubectl apply -f "$CRDS/" -o name)
kubectl wait --for=condition=Established --timeout=90s "${crds[@]}"

# manifests/deploy as kubectl apply -k would apply it, with the agent image swapped for the
# one the nodes built (cn2mirror:dev by default) and imagePullPolicy: Never. The
# kustomization takes its CRDs from ../crds, which kustomize reads only when told to.
log "agent: manifests/deploy (kustomize), image $AGENT_IMAGE"
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
kubectl kustomize --load-restrictor LoadRestrictionsNone "$DEPLOY" |
  python3 "$REPO/vagrant/lib/local_image.py" --image "$AGENT_IMAGE" >"$rendered"
kubectl apply -f "$rendered"

log "lab workloads: web, client, bystander, analyzer1, analyzer2 (namespace lab)"
kubectl apply -f "$WORKLOADS"
log "ready; the workers' pods start when they join. Then, on the host: vagrant/verify.sh"
