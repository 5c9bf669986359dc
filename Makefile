# The mesh's entry points. `make demo` and `make test` are the two commands README promises
# work on a fresh machine; `.ci/run` calls `make test`.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release test test-unit test-netns fuzz-smoke k8s-smoke lint fmt presubmit demo demo-up demo-down demo-loopback lab-smoke lab-deps lab-release deps clean bench bench-quick bench-cp bench-deps callgrind

all: build

build:
	$(CARGO) build --workspace --locked

release:
	$(CARGO) build --workspace --locked --release

## demo: the netns lab (root; installs its apt packages): a router and two node netns, pods
## wired by Debian's CNI plugins with mesh-cni chained last, the real node agents, ztunnels
## (in-pod shared mode) and istiod-lite; traffic, identities, what crossed, a deny; teardown.
demo: lab-deps lab-release
	python3 e2e/lab/lab.py demo --no-install

## demo-up / demo-down: the same lab left running to explore; demo-down removes exactly it.
demo-up: lab-deps lab-release
	python3 e2e/lab/lab.py up --no-install

demo-down:
	python3 e2e/lab/lab.py down

## demo-loopback: the older demo: two ztunnels on loopback, SOCKS5 entry, local config.
demo-loopback: release
	bash e2e/demo-loopback.sh

## lab-smoke: the demo's lab with the debug binaries `make test` builds (CI runs this).
lab-smoke: lab-deps
	$(CARGO) build --locked -p ztunnel -p cni-plugin -p istiod-lite -p waypoint
	MESH_LAB_BIN=target/debug python3 e2e/lab/lab.py demo --no-install

lab-release:
	$(CARGO) build --release --locked -p ztunnel -p cni-plugin -p istiod-lite -p waypoint

lab-deps:
	python3 e2e/lab/lab.py deps

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

## bench: the full benchmark (netns topology, nomesh/ruler/ours side by side; root). Not part of `make test`.
bench: bench-deps
	$(CARGO) build --release --locked -p ztunnel -p mesh-bench -p meshctl -p waypoint -p cni-plugin
	python3 bench/run.py $(BENCH_ARGS)

## bench-quick: the same in under 3 minutes (fewer, shorter repetitions).
bench-quick: bench-deps
	$(CARGO) build --release --locked -p ztunnel -p mesh-bench -p meshctl -p waypoint -p cni-plugin
	python3 bench/run.py --quick $(BENCH_ARGS)

## callgrind: instruction counts of the micro-benchmarks against bench/baseline/callgrind.json.
callgrind: bench-deps
	$(CARGO) build --release --locked -p mesh-bench
	bash bench/callgrind.sh $(CALLGRIND_ARGS)

## bench-cp: control-plane scale (istiod-lite with 10k pods / 1k services, 100 xDS clients).
bench-cp:
	$(CARGO) build --release --locked -p istiod-lite -p mesh-bench
	target/release/mesh-bench cp-scale --istiod-bin target/release/istiod-lite $(CP_ARGS)

bench-deps:
	@for t in iperf3 sockperf socat valgrind nginx wrk curl openssl; do command -v $$t >/dev/null || need="$$need $$t"; done; \
	if [ -n "$$need" ]; then \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need; rc=$$?; \
	  if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; \
	fi
