#!/bin/bash
# Build kube-apiserver and kube-controller-manager v1.20.2 for the local test control plane.
#
# Why: no package registry ships a current kube-apiserver. Debian bookworm's `kubernetes` source package
# carries its whole vendor/ tree, so it builds offline with Debian's Go (1.19) and only apt access.
# kubetune_cli.localenv.binaries runs this only when no prebuilt binary is found (KUBEBUILDER_ASSETS, the cache,
# ../shared/envtest/bin/*.xz): 7 min on a quiet 2-core machine, ~25 min under load; ~1.4 GB RAM; needs root
# for apt-get install.
#
# Usage: OUT=/dir/for/binaries bash tools/build-kube.sh    (W= a work dir to keep; default a fresh temp dir)
set -euo pipefail
KUBE_DEB_VERSION=${KUBE_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}
KUBE_VERSION=${KUBE_VERSION:-v1.20.2}
W=${W:-$(mktemp -d)}; OUT=${OUT:-$W/bin}
mkdir -p "$W/apt/lists/partial" "$OUT"
export DEBIAN_FRONTEND=noninteractive

apt-get install -y --no-install-recommends golang-go dpkg-dev >/dev/null

# Source packages through a private deb-src list derived from the machine's deb822 sources: the system's
# own apt lists stay as they are.
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$W/apt/src.sources"
APT="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$W/apt -o Dir::State::Lists=$W/apt/lists"
# shellcheck disable=SC2086
apt-get $APT update -qq
cd "$W"
# shellcheck disable=SC2086
apt-get $APT source --download-only "kubernetes=$KUBE_DEB_VERSION"
apt-get download golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
rm -rf kubernetes-1.20.2 x
tar xzf kubernetes_*.orig.tar.gz
for deb in golang-github-*.deb; do dpkg-deb -x "$deb" x; done

# With Go >= 1.18 the vendored reflect2 1.0.1 crashes (fault in mapiterinit) on the first custom-resource
# request: swap in Debian's reflect2 1.0.2 and json-iterator 1.1.12.
for pkg in modern-go/reflect2 json-iterator/go; do
  rm -rf "kubernetes-1.20.2/vendor/github.com/$pkg"
  cp -r "x/usr/share/gocode/src/github.com/$pkg" "kubernetes-1.20.2/vendor/github.com/$pkg"
done

export GO111MODULE=off GOPATH=$W/gopath GOCACHE=${GOCACHE:-$W/gocache} GOFLAGS= CGO_ENABLED=0
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$W/kubernetes-1.20.2" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# pkg/generated/openapi/zz_generated.openapi.go is not in the release tarball: generate it from every
# package tagged +k8s:openapi-gen (as hack/update-codegen does), minus the code generators' own samples.
go build -o "$W/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
INPUTS=$(find -H . \( -path ./_\* -o -path ./.\* -o -path ./vendor \) -prune -o -type f -name '*.go' -print \
  | sed 's|^./staging/src|vendor|; s|^./||' \
  | xargs grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' \
  | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
  | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
"$W/openapi-gen" -i "$INPUTS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$W/openapi-violations.report"

# Stamp the version the way the upstream build does, so `--version` and discovery report v1.20.2.
P=k8s.io/kubernetes/vendor/k8s.io
LDFLAGS="-s -w -X $P/component-base/version.gitVersion=$KUBE_VERSION -X $P/component-base/version.gitMajor=1"
LDFLAGS="$LDFLAGS -X $P/component-base/version.gitMinor=20 -X $P/component-base/version.gitTreeState=clean"
LDFLAGS="$LDFLAGS -X $P/client-go/pkg/version.gitVersion=$KUBE_VERSION"
for cmd in kube-apiserver kube-controller-manager; do
  go build -tags selinux,notest -ldflags "$LDFLAGS" -o "$OUT/$cmd" "./cmd/$cmd"
done
"$OUT/kube-apiserver" --version
