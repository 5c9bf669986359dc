# The mesh's entry points. `make demo` and `make test` are the two commands README promises
# work on a fresh machine; `.ci/run` calls `make test`.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release test test-unit test-netns fuzz-smoke k8s-smoke lint fmt presubmit demo deps clean

all: build

build:
	$(CARGO) build --workspace --locked

release:
	$(CARGO) build --workspace --locked --release

## demo: two ztunnels on loopback, a client and an echo server, traffic, a policy that denies.
demo: release
	bash e2e/demo-loopback.sh

## test: every test tier this machine can run (netns tests need root; CI runs as root).
test:
	$(CARGO) test --workspace --locked --no-fail-fast
	$(MAKE) fuzz-smoke

test-netns:
	$(CARGO) test --locked -p ztunnel --test netns -- --test-threads=1

## fuzz-smoke: run each fuzz target briefly (needs cargo-fuzz; .ci/run installs it).
fuzz-smoke:
	bash fuzz/smoke.sh

## k8s-smoke: real kube-apiserver v1.20.2 + etcd on loopback (built once into
## $MESH_K8S_DIR, default /var/cache/mesh-k8s; see docs/testing.md), checked with kubectl and curl.
k8s-smoke:
	bash e2e/k8s/smoke.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

presubmit: lint test

clean:
	$(CARGO) clean
