#!/usr/bin/env bash
# Builds the local control plane (Kubernetes, etcd, kwok, helm, MinIO, Traefik) from the Go module
# proxy and prints a bin directory holding all of them. Each binary is cached under
# ~/.cache/pollinate/testbed/ keyed by its own inputs (go.mod, go.sum, flags, Go version),
# so a second run, from any clone on this machine, only links what is already built.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.35.8
HELM_VERSION=v3.21.4
cache=${POLLINATE_CACHE:-$HOME/.cache/pollinate}/testbed
export CGO_ENABLED=0
log() { printf '[testbed] %s\n' "$*" >&2; }

# One build at a time per cache: a second build started meanwhile (a CI run, a test's testbed,
# another clone) waits and then finds every binary cached, instead of compiling the same ones
# again on the same cores and racing the first for the same output files.
mkdir -p "$cache"
exec {build_lock}>"$cache/.build.lock"
if ! flock -n "$build_lock"; then
  log "another build is using $cache; waiting for it"
  flock "$build_lock"
fi

keys=()
build() {  # name module-dir package tags ldflags
  local name=$1 dir=$2 pkg=$3 tags=$4 ldflags=$5
  local key
  key=$( { cat "$here/$dir/go.mod" "$here/$dir/go.sum"; echo "$pkg|$tags|$ldflags"; go env GOVERSION GOOS GOARCH; } \
    | sha256sum | cut -c1-16)
  keys+=("$name-$key")
  local target=$cache/$name-$key/$name
  [ -x "$target" ] && return
  log "building $name (cold build; cached afterwards under $cache)"
  local t0=$SECONDS
  mkdir -p "$(dirname "$target")"
  (cd "$here/$dir" && GOFLAGS=-mod=readonly go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
    -o "$target.tmp" "$pkg")
  mv "$target.tmp" "$target"
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
build kwokctl kwok sigs.k8s.io/kwok/cmd/kwokctl "" ""
# Without these, offline `helm template` and `helm lint` assume Kubernetes 1.20.
h=helm.sh/helm/v3
build helm helm $h/cmd/helm "" "-X $h/pkg/chartutil.k8sVersionMajor=1 -X $h/pkg/chartutil.k8sVersionMinor=$minor \
 -X $h/pkg/lint/rules.k8sVersionMajor=1 -X $h/pkg/lint/rules.k8sVersionMinor=$minor -X $h/internal/version.version=$HELM_VERSION"
build minio minio github.com/minio/minio kqueue ""
build traefik traefik github.com/traefik/traefik/v3/cmd/traefik "" \
  "-X github.com/traefik/traefik/v3/pkg/version.Version=$(cd "$here/traefik" && go list -m -f '{{.Version}}' github.com/traefik/traefik/v3)"

bin=$cache/bin-$(printf '%s\n' "${keys[@]}" | sha256sum | cut -c1-16)
if [ ! -d "$bin" ]; then
  mkdir -p "$bin.tmp"
  for k in "${keys[@]}"; do ln -sf "$cache/$k/${k%-*}" "$bin.tmp/${k%-*}"; done
  # kwok needs Stage objects to simulate node and pod lifecycles; use the ones its release ships.
  stages=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    { cat "$stages/$f"; echo '---'; } >> "$bin.tmp/kwok-stages.yaml"
  done
  rm -rf "$bin"; mv "$bin.tmp" "$bin"
fi
echo "$bin"
