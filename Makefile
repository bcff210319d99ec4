# rls-relay — the commands a developer and CI use. `make test` is the one test command.

CARGO ?= cargo
# Smaller target/ and faster links; backtraces keep line numbers.
export CARGO_TERM_COLOR ?= always

.PHONY: help test test-rust test-browser lint fmt run demo bench soak clean

help:
	@echo "make demo   - throwaway Postgres + example schema + trade simulator + page at http://127.0.0.1:8080/"
	@echo "make test   - every test: unit, end-to-end against a real Postgres, browser"
	@echo "              (make test-rust, make test-browser: one half)"
	@echo "make lint   - rustfmt --check and clippy -D warnings"
	@echo "make run    - rls-relay serve with the settings in .env"
	@echo "make bench  - the benchmark (prints one table of ratios)"
	@echo "make soak   - the randomized isolation test, longer, with new seeds"

test: test-rust test-browser

test-rust:
	$(CARGO) test --all-targets --locked

# Headless Chromium against `rls-relay demo`; installs Chromium (apt) and the npm
# packages (npm ci) when missing. Screenshot and log in artifacts/.
test-browser:
	tests/browser/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

run:
	@test -f .env || { echo "no .env: cp .env.example .env and edit it"; exit 1; }
	set -a && . ./.env && set +a && $(CARGO) run --release -- serve

demo:
	$(CARGO) run --release --locked -- demo

# The end-to-end benchmark: a durable throwaway Postgres, the release relay as its own
# process, 16 writers, 1,000 then 10,000 WebSocket clients; prints one table (README,
# "Performance"). `cargo bench` builds target/release/rls-relay itself (the benchmark runs
# that binary), so there is no separate `cargo build --release` that would build the
# crate a second time with other features. The open-files limit is raised for the 10,000
# sockets on each side. Knobs: BENCH_* variables (see `-- --help`), BENCH_ARGS=--quick.
bench:
	ulimit -n $$(ulimit -Hn) 2>/dev/null || ulimit -n 20000 2>/dev/null || true; \
	$(CARGO) bench --locked --bench relay -- $(BENCH_ARGS)

# The randomized isolation test, with new seeds each run (SOAK_SEEDS seeds of SOAK_STEPS
# steps); a failure prints its seed, replayable with RANDOM_SEEDS=<seed>.
soak:
	SOAK_SEEDS=$${SOAK_SEEDS:-50} SOAK_STEPS=$${SOAK_STEPS:-300} \
	  $(CARGO) test --release --locked --test isolation_random -- --ignored --nocapture soak

clean:
	$(CARGO) clean
