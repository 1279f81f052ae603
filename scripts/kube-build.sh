#!/usr/bin/env bash
# Builds (once) the real Kubernetes 1.20 control plane the k8s tests run against:
# kube-apiserver and kube-controller-manager from Debian's `kubernetes` source package,
# plus kubectl when the machine has none. etcd comes from Debian's `etcd-server`.
#
# The binaries are cached outside the clone, in
#   ${SAMI_CACHE_DIR:-$HOME/.cache/sami}/kube-1.20/bin/
# with a `.complete` marker; a second run only checks the marker and exits.
# See shared/testing/REAL-COMPONENTS.md ("Kubernetes control plane") for why each step is here:
# Go 1.19 crashes the 1.20 apiserver at the first custom-resource write unless the vendored
# modern-go/reflect2 (v1.0.1) is replaced with Debian's 1.0.2 source.
#
# Go 1.19 also breaks the vendored OpenAPI validators (kube-openapi, go-openapi): their type
# check compares the reflect.Value of a value with that of its type's zero using DeepEqual,
# which since Go 1.18 (reflect.Zero and an empty string in an interface share one zero buffer)
# is true for "". The apiserver then rejects every empty string in a custom resource ("must be
# of type string: "null"") and every CRD with `default: ""`. The patch below restores what the
# check meant under the Go it was written for: only nil (or a nil map/pointer) counts as null.
#
# Needs root (or sudo) for apt on a fresh machine; runs without stdin (CI=true).
# SAMI_BUILD_KUBECTL=1 builds kubectl 1.20 too even when the machine has a kubectl.
set -euo pipefail

# Bump when the recipe changes: binaries cached by an older recipe are rebuilt.
recipe="debian-1.20.2 reflect2-1.0.2 openapi-zero-fix-2"

cache=${SAMI_CACHE_DIR:-$HOME/.cache/sami}
dest="$cache/kube-1.20"
bin="$dest/bin"

have_bins() {
  [ -f "$dest/.complete" ] && [ "$(head -n1 "$dest/.complete")" = "$recipe" ] &&
    [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] &&
    { [ -x "$bin/kubectl" ] ||
      { [ "${SAMI_BUILD_KUBECTL:-}" != 1 ] && command -v kubectl >/dev/null 2>&1; }; }
}

# Fast path: nothing to do (no apt, no lock).
if have_bins && command -v etcd >/dev/null 2>&1; then
  exit 0
fi

say() { echo "kube-build: $*" >&2; }

mkdir -p "$dest"
log="$dest/build.log"

# One build at a time (make test and the pytest plugin may both call this).
exec 9>"$dest/.lock"
flock 9
if have_bins && command -v etcd >/dev/null 2>&1; then
  exit 0
fi

: >"$log"
# Runs a long step with its output in the log; shows the log's tail when it fails.
step() {
  local title=$1
  shift
  say "$title"
  if ! "$@" >>"$log" 2>&1; then
    echo "----- last lines of $log -----" >&2
    tail -n 80 "$log" >&2
    say "FAILED: $title (full log: $log)"
    exit 1
  fi
}

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
    say "must run as root (or with passwordless sudo) to install packages"
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
apt_get() {
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -q \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

apt_updated=""
apt_update() {
  if [ -z "$apt_updated" ]; then
    step "apt-get update" apt_get update
    apt_updated=1
  fi
}

# etcd-server is needed at test time even when the binaries are cached.
if ! command -v etcd >/dev/null 2>&1; then
  apt_update
  step "installing etcd-server" apt_get install --no-install-recommends etcd-server
fi
if have_bins; then
  say "cached binaries in $bin"
  exit 0
fi

start=$(date +%s)
say "building kube-apiserver and kube-controller-manager 1.20" \
  "(first run only: 5-10 minutes; log: $log)"

# A deb-src entry for bookworm main, if none is configured.
if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  say "adding a deb-src entry for bookworm main"
  $sudo tee /etc/apt/sources.list.d/sami-deb-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_updated=""
fi
apt_update
step "installing build packages" apt_get install --no-install-recommends \
  golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev dpkg-dev make

build_kubectl=""
if [ "${SAMI_BUILD_KUBECTL:-}" = 1 ] || ! command -v kubectl >/dev/null 2>&1; then
  build_kubectl=1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sami-kube-build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

cd "$work"
step "downloading the kubernetes source package" apt-get source kubernetes
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
if [ -z "$src" ] || [ ! -d "$src/vendor" ]; then
  say "apt-get source kubernetes gave no source tree with vendor/ in $work"
  exit 1
fi
version=$(basename "$src")
say "source: $version"

# The reflect2 fix: Debian's 1.0.2 source instead of the vendored 1.0.1 (minus its go.mod).
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
if [ ! -d "$reflect2" ]; then
  say "missing $reflect2 (golang-github-modern-go-reflect2-dev)"
  exit 1
fi
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r "$reflect2" "$src/vendor/github.com/modern-go/reflect2"
rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod" \
  "$src/vendor/github.com/modern-go/reflect2/go.sum"

# The OpenAPI zero-value fix (see the top of this file), in both vendored copies of the
# validator: k8s.io/kube-openapi/pkg/validation/validate (used for custom resources and CRD
# defaults) and github.com/go-openapi/validate.
zero_check='reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))'
for typego in "$src/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go" \
  "$src/vendor/github.com/go-openapi/validate/type.go"; do
  if ! grep -qF "$zero_check" "$typego"; then
    say "unexpected source: $typego lacks the zero-value check to patch"
    exit 1
  fi
  ZERO_CHECK=$zero_check perl -0pi -e 's/\Q$ENV{ZERO_CHECK}\E/isNilLike(data)/' "$typego"
  cat >>"$typego" <<'GO'

// isNilLike was added by sami's scripts/kube-build.sh: under Go >= 1.18 the original
// DeepEqual of two reflect.Values is true for "", which made "" fail `type: string`.
func isNilLike(data interface{}) bool {
	v := reflect.ValueOf(data)
	switch v.Kind() {
	case reflect.Map, reflect.Ptr, reflect.Func, reflect.Chan, reflect.UnsafePointer:
		return v.IsNil()
	}
	return false
}
GO
  if ! grep -qF 'data == nil || isNilLike(data)' "$typego"; then
    say "patching $typego failed"
    exit 1
  fi
done

# Build as Debian does: a GOPATH whose src/k8s.io/kubernetes is the source root.
mkdir -p "$src/.go/src/k8s.io"
ln -s "$src" "$src/.go/src/k8s.io/kubernetes"
targets="cmd/kube-apiserver cmd/kube-controller-manager"
if [ -n "$build_kubectl" ]; then targets="$targets cmd/kubectl"; fi
build() {
  cd "$src/.go/src/k8s.io/kubernetes"
  # (hack/lib/golang.sh keeps its Go build cache under _output/, removed with the tree)
  env GOPATH="$src/.go" GOFLAGS="" GO111MODULE= CGO_ENABLED=0 \
    KUBE_GIT_VERSION="v1.20.2" KUBE_GIT_TREE_STATE=clean \
    make WHAT="$targets"
}
step "compiling $targets" build

out="$src/_output/local/bin/linux/$(go env GOARCH)"
[ -d "$out" ] || out=$(dirname "$(find "$src/_output" -type f -name kube-apiserver | head -n1)")
rm -rf "$bin.new"
mkdir -p "$bin.new"
for b in kube-apiserver kube-controller-manager; do
  cp "$out/$b" "$bin.new/"
done
if [ -n "$build_kubectl" ]; then cp "$out/kubectl" "$bin.new/"; fi
rm -rf "$bin"
mv "$bin.new" "$bin"
"$bin/kube-apiserver" --version >>"$log" 2>&1
printf '%s\n%s built %s in %s s\n' "$recipe" "$version" "$(date -u +%FT%TZ)" \
  "$(($(date +%s) - start))" >"$dest/.complete"
say "done in $(($(date +%s) - start)) s: $(ls "$bin" | tr '\n' ' ')"
