# dflockd: the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
PYTEST_ARGS ?=

.PHONY: run cluster build release doc test test-rust test-clients test-static test-sim test-fuzz static soak sim fuzz bench bench-cluster lint fmt clean

## Run the server on its defaults (127.0.0.1:6388).
run:
	$(CARGO) run --release --bin dflockd

## Three local nodes of a replicated cluster (clients on ports 6391-6393).
cluster:
	bash scripts/cluster.sh

## The server and the dflock command (target/debug/).
build:
	$(CARGO) build -p dflockd --bin dflockd -p dflockd-client --bin dflock

release:
	$(CARGO) build --release -p dflockd --bin dflockd -p dflockd-client --bin dflock

## Every test: unit, integration (real binary, real sockets), the published
## Python clients, the static binary alone in an empty root, one million
## simulated operations, and a short run of each fuzzer.
test: test-rust test-clients test-static test-sim test-fuzz

test-rust:
	$(CARGO) test --workspace --all-targets
	$(CARGO) test -p dflockd-client --doc

test-clients: build
	bash tests/python/run.sh $(PYTEST_ARGS)

## Fully static x86_64 Linux binary at target/static/dflockd (what the Dockerfile copies).
static:
	bash scripts/static.sh

## The static binary alone in an empty chroot (prints SKIP where chroot is not permitted).
test-static: static
	bash tests/static/empty_root.sh

## The deterministic simulations in release mode: the single-node one,
## 1,000,000 steps per scenario, then the cluster one, 1,000,000 simulated ms
## per scenario.
test-sim:
	bash scripts/sim.sh
	bash scripts/cluster_sim.sh

## Each fuzz target for 15 s (prints SKIP without a nightly toolchain).
test-fuzz:
	bash scripts/fuzz.sh 15

## A long simulation: make sim SIM_SEED=42 SIM_STEPS=20000000 CLUSTER_SIM_STEPS=5000000
SIM_SEED ?= random
SIM_STEPS ?= 10000000
CLUSTER_SIM_STEPS ?= 3000000
sim:
	bash scripts/sim.sh $(SIM_SEED) $(SIM_STEPS)
	bash scripts/cluster_sim.sh $(SIM_SEED) $(CLUSTER_SIM_STEPS)

## Each fuzz target for FUZZ_SECS (default 300) seconds.
FUZZ_SECS ?= 300
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECS)

## A longer soak (SOAK_SECS, default 60) of random clients against the release binary.
SOAK_SECS ?= 60
soak:
	SOAK_SECS=$(SOAK_SECS) SOAK_CLIENTS=$${SOAK_CLIENTS:-48} $(CARGO) test --release --test soak -- --nocapture

## Benchmark against the Python reference server and Redis (bench/results/),
## then idle memory, memory per connection and binary size.
bench:
	bash scripts/bench.sh
	bash scripts/measure_memory.sh

## A 3-node cluster against a 3-node etcd cluster (etcd-server installed if
## missing), a durable and an in-memory single node, and kill -9 failover on
## both sides: bench/results/cluster.{txt,json,svg}. About 12 minutes.
## Arguments: make bench-cluster BENCH_CLUSTER_ARGS="--repeats 1 --kills 2"
BENCH_CLUSTER_ARGS ?=
bench-cluster:
	bash scripts/bench_cluster.sh $(BENCH_CLUSTER_ARGS)

## The load generator's etcd driver is linted too when a protoc >= 3.12 is
## there (the etcd client crate compiles its .proto files with it).
lint: doc
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if protoc --version 2>/dev/null | awk '{split($$2, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 12))}'; then \
		echo "$(CARGO) clippy -p dflockd-bench --all-targets --features etcd -- -D warnings"; \
		$(CARGO) clippy -p dflockd-bench --all-targets --features etcd -- -D warnings; \
	else \
		echo "SKIP: clippy of the bench's etcd feature (needs protoc >= 3.12: apt-get install protobuf-compiler)"; \
	fi

## API docs of the client library (warnings are errors).
doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p dflockd-client --no-deps

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .venv
