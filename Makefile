# The two commands of the README: `make run` (install and serve with embedded defaults) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

# DTLSSocket (the dtls extra: CoAP over DTLS) builds tinydtls from source with autoreconf: as
# root on Debian its tools are installed first. If it still cannot be built, the rest installs,
# CoAP over DTLS cannot be turned on, and its tests skip saying why.
DTLS_BUILD_TOOLS := autoconf automake libtool

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v autoreconf >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make: installing $(DTLS_BUILD_TOOLS) to build DTLSSocket"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends $(DTLS_BUILD_TOOLS) >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(DTLS_BUILD_TOOLS) >/dev/null; }; \
	fi
	$(PY) -m pip install -q -e '.[dev]' -e sdk/python
	$(PY) -m pip install -q -e '.[dev,dtls]' || echo "make: DTLSSocket could not be built (it needs $(DTLS_BUILD_TOOLS)): CoAP over DTLS is off and its tests skip" >&2
	touch $(STAMP)

# MQTT's standard port is often held by a local broker (Mosquitto): then this run moves to 1884,
# and says so. Conduit itself keeps 1883 as its default and refuses a taken port with a clear error.
run: $(STAMP)
	@if [ -z "$$CONDUIT_MQTT_PORT" ] && ! $(PY) -c 'import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", 1883))' 2>/dev/null; then \
		echo "make run: port 1883 is taken (another MQTT broker?): MQTT listens on 1884 for this run"; \
		export CONDUIT_MQTT_PORT=1884; \
	fi; \
	exec $(VENV)/bin/conduit serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
