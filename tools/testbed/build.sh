#!/usr/bin/env bash
# Builds the local control plane (Kubernetes, etcd, kwok, helm, MinIO, Traefik) from the Go module
# proxy and prints a bin directory holding them. Each binary is cached under
# ~/.cache/pollinate/testbed/ keyed by its own inputs (go.mod, go.sum, flags, Go version),
# so a second run, from any clone on this machine, only links what is already built.
#
#   build.sh [core|all]   core: what a simulated cluster needs; all (default): core + Traefik,
#                         the ingress controller of execute mode (the slowest to build)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.35.8
HELM_VERSION=v3.21.4
# Bumped when the layout of a cache entry changes, so entries of the old layout are not trusted.
CACHE_LAYOUT=2
cache=${POLLINATE_CACHE:-$HOME/.cache/pollinate}/testbed
export CGO_ENABLED=0
log() { printf '[testbed] %s\n' "$*" >&2; }
what=${1:-all}
case $what in core|all) ;; *) log "usage: build.sh [core|all]"; exit 2 ;; esac
mkdir -p "$cache"
t_all=$SECONDS

# A cache entry is trusted only with the stamp written after its binary was moved into place
# whole: a build killed half-way, or one that ran out of disk, leaves no stamp (or a binary whose
# size and time no longer match it) and is built again, never used.
stamp_of() { stat -L -c '%s %Y' "$1"; }
intact() { [ -x "$1" ] && [ -f "$1.built" ] && [ "$(stamp_of "$1")" = "$(cat "$1.built")" ]; }

keys=()
build() {  # name module-dir package tags ldflags
  local name=$1 dir=$2 pkg=$3 tags=$4 ldflags=$5
  local key
  key=$( { cat "$here/$dir/go.mod" "$here/$dir/go.sum"; echo "$pkg|$tags|$ldflags|$CACHE_LAYOUT"; \
           go env GOVERSION GOOS GOARCH; } | sha256sum | cut -c1-16)
  keys+=("$name-$key")
  local entry=$cache/$name-$key
  local target=$entry/$name
  if intact "$target"; then
    log "$name: cached"
    return
  fi
  # One build per binary at a time: a second build started meanwhile (a CI run, a test's
  # testbed, another clone) waits for this binary, then finds it cached, instead of compiling
  # it again on the same cores; builds of other binaries go on beside it.
  mkdir -p "$entry"
  local lock
  exec {lock}>"$entry.lock"
  if ! flock -n "$lock"; then
    log "$name: another build is making it; waiting"
    flock "$lock"
  fi
  if intact "$target"; then
    exec {lock}>&-
    log "$name: cached (built meanwhile by another build)"
    return
  fi
  if [ -e "$target" ] || [ -e "$target.tmp" ]; then
    log "$name: the cached copy is incomplete (a build stopped half-way?): discarded"
  fi
  rm -f "$target" "$target.built" "$target.tmp"
  log "building $name (cold build; cached afterwards under $cache)"
  local t0=$SECONDS
  (cd "$here/$dir" && GOFLAGS=-mod=readonly go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
    -o "$target.tmp" "$pkg")
  mv "$target.tmp" "$target"
  stamp_of "$target" > "$target.built.tmp"
  mv "$target.built.tmp" "$target.built"
  exec {lock}>&-
  log "built $name in $((SECONDS - t0)) s"
}

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
v=k8s.io/component-base/version; cg=k8s.io/client-go/pkg/version
# Stamped so /version, kubectl's skew check and helm's kubeVersion see a real 1.35.
k8s_ldflags="-X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
k8s_ldflags+=" -X $v.buildDate=1970-01-01T00:00:00Z -X $cg.gitVersion=$K8S_VERSION -X $cg.gitMajor=1 -X $cg.gitMinor=$minor"
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$c" k8s "k8s.io/kubernetes/cmd/$c" selinux,notest,grpcnotrace "$k8s_ldflags"
done
build etcd etcd go.etcd.io/etcd/server/v3 "" ""
build kwok kwok sigs.k8s.io/kwok/cmd/kwok "" ""
# Without these, offline `helm template` and `helm lint` assume Kubernetes 1.20.
h=helm.sh/helm/v3
build helm helm $h/cmd/helm "" "-X $h/pkg/chartutil.k8sVersionMajor=1 -X $h/pkg/chartutil.k8sVersionMinor=$minor \
 -X $h/pkg/lint/rules.k8sVersionMajor=1 -X $h/pkg/lint/rules.k8sVersionMinor=$minor -X $h/internal/version.version=$HELM_VERSION"
build minio minio github.com/minio/minio kqueue ""
if [ "$what" = all ]; then
  build traefik traefik github.com/traefik/traefik/v3/cmd/traefik "" \
    "-X github.com/traefik/traefik/v3/pkg/version.Version=$(cd "$here/traefik" && go list -m -f '{{.Version}}' github.com/traefik/traefik/v3)"
fi

bin=$cache/bin-$(printf '%s\n' "${keys[@]}" | sha256sum | cut -c1-16)
if [ ! -d "$bin" ]; then
  tmp=$(mktemp -d "$bin.XXXXXX")
  for k in "${keys[@]}"; do ln -sf "$cache/$k/${k%-*}" "$tmp/${k%-*}"; done
  # kwok needs Stage objects to simulate node and pod lifecycles; use the ones its release ships.
  stages=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    { cat "$stages/$f"; echo '---'; } >> "$tmp/kwok-stages.yaml"
  done
  chmod 755 "$tmp"
  # Another build may have made the same directory meanwhile: either copy is the same.
  mv -T "$tmp" "$bin" 2>/dev/null || rm -rf "$tmp"
fi
log "$what binaries ready in $((SECONDS - t_all)) s: $bin"
echo "$bin"
