# ltserve: `make demo` (the main job on the embedded default) and `make test` work on a fresh machine by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= cpu,train,dev
DEMO_SERVE ?= 1
DEMO_FRESH ?= 0
DEMO_RUN   ?= runs/demo
DEMO_MODEL ?= runs/demo-model
PORT   ?= 3000

.PHONY: install data demo test default-model bench bench-gpu clean help

help:
	@echo "make demo | test | install | data | default-model | bench | bench-gpu | clean"

install: $(STAMP)

# Creates .venv once; reinstalls when pyproject.toml or constraints.txt change. constraints.txt keeps fresh
# installs on the versions the test suite passed with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# Fashion-MNIST: Debian's dataset-fashion-mnist when root on Debian, else the official download into the user cache.
data: install
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) || true; \
	fi
	$(BIN)/python -m ltserve.data fetch

test: install data
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Train -> rebalance -> heads table -> export the best head -> serve (DEMO_SERVE=0 stops before serving).
# An existing $(DEMO_RUN) is resumed (a finished stage 1 is not trained again); DEMO_FRESH=1 starts it over.
demo: install data
	$(BIN)/python -m ltserve.demo --run $(DEMO_RUN) --model $(DEMO_MODEL) --port $(PORT) \
	  $(if $(filter 0,$(DEMO_SERVE)),--no-serve,) $(if $(filter 1,$(DEMO_FRESH)),--fresh,)

# The committed default model served by `bentoml serve` on a fresh clone (seeded; model.json records this command).
default-model: install data
	$(BIN)/python -m ltserve.demo --run runs/default-model --model models/fashion-lt --no-serve --fresh \
	  --command "make default-model"

bench: install data
	$(BIN)/python -m benchmarks.run_all --device cpu

bench-gpu:
	bash benchmarks/gpu_run.sh

clean:
	rm -rf runs/demo runs/demo-model .pytest_cache
