# The two commands of the README: `make run` (install and serve with embedded defaults) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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
