# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench serve stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/setup-system.sh
	bash scripts/demo.sh

test: $(STAMP)
	bash scripts/setup-system.sh --for-tests
	bash scripts/run-tests.sh

bench: $(STAMP)
	bash scripts/setup-system.sh
	$(VENV)/bin/python bench/run.py

serve: $(STAMP)
	bash scripts/setup-system.sh
	bash scripts/serve.sh

stop:
	-COUNTEROPS_HOME=$(CURDIR)/.demo/home $(VENV)/bin/counterops server stop
	-$(VENV)/bin/counterops fleet down --dir .demo/fleet
	-[ -f .demo/fleet/inbox.pid ] && kill $$(cat .demo/fleet/inbox.pid) 2>/dev/null; rm -f .demo/fleet/inbox.pid

clean: stop
	rm -rf .demo $(VENV) *.egg-info
