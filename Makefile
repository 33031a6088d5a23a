# dflockd: the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
PYTEST_ARGS ?=

.PHONY: run build release test test-rust test-clients lint fmt clean

## Run the server on its defaults (127.0.0.1:6388).
run:
	$(CARGO) run --release --bin dflockd

build:
	$(CARGO) build --bin dflockd

release:
	$(CARGO) build --release --bin dflockd

## Every test: unit, integration (real binary, real sockets), real PyPI clients.
test: test-rust test-clients

test-rust:
	$(CARGO) test --all-targets

test-clients: build
	bash tests/python/run.sh $(PYTEST_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .venv
