# kiln — two commands on a fresh Debian 12 machine:
#   make demo   boot a microVM, snapshot it, restore it twice (installs what it needs)
#   make test   run the whole test suite, real VMs included (installs what it needs)

SHELL := /bin/bash
CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
INIT_BIN := target/$(TARGET)/release/kiln-init
# Tests cache the guest kernel and base images here, away from the user's own data dir.
TEST_HOME ?= $(CURDIR)/target/kiln-test-home

export KILN_INIT_BIN := $(CURDIR)/$(INIT_BIN)

PYENV := target/pyenv

.PHONY: all deps build init pyenv jsenv demo test fuzz bench lint clean

all: build

## deps: install the host packages of scripts/host-tools.tsv (all but optional lines) when missing.
deps:
	@./scripts/install-deps.sh

## pyenv: the AWS CLI and boto3 (and so botocore's lambda-microvms model), and E2B's SDK, for the tests.
pyenv: $(PYENV)/.done
$(PYENV)/.done:
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install -q --disable-pip-version-check 'botocore>=1.44.8' 'boto3>=1.42' awscli 'e2b>=2.63'
	touch $@

## jsenv: E2B's JS SDK (npm `e2b`) for the E2B test's smoke run.
jsenv: target/e2b-js/.done
target/e2b-js/.done:
	mkdir -p target/e2b-js
	cd target/e2b-js && npm install --silent --no-audit --no-fund e2b
	touch $@

## init: the guest's PID 1, a static binary.
init:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(TARGET) -p kiln-agent --bin kiln-init

build: deps init
	$(CARGO) build --release --workspace --bins

demo: build
	./scripts/demo.sh

# The test build makes the binaries too (every package with a binary has integration
# tests), with the features the tests unify: a separate `cargo build` compiled ~70 crates twice.
test: deps init pyenv jsenv
	KILN_HOME=$(TEST_HOME) $(CARGO) test --release --workspace --no-run
	KILN_HOME=$(TEST_HOME) ./target/release/kiln doctor
	KILN_HOME=$(TEST_HOME) $(CARGO) test --release --workspace --no-fail-fast

## fuzz: the property tests of every parser of guest-sent bytes (agent frames, QMP lines,
## DNS, TLS ClientHello, HTTP heads) with many more cases than `make test` runs.
FUZZ_CASES ?= 20000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p kiln-agent -p kiln-vmm -p kiln-net --lib

bench: build
	@./scripts/install-deps.sh --bench
	$(CARGO) bench -p kiln-vmm --bench restore
	$(CARGO) bench -p kiln-image --bench build
	$(CARGO) bench -p kilnd --bench proxy
	KILN_HOME=$(TEST_HOME) $(CARGO) bench -p kilnd --bench launch
	KILN_HOME=$(TEST_HOME) $(CARGO) bench -p kilnd --bench density

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
