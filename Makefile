# Two commands on a fresh machine: `make demo` (label a folder of generated images) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Packages go in with uv (downloads in parallel: 48 s against pip's 3 min 16 s for both environments here, the same
# versions), itself installed into the environment by pip; where uv cannot be installed, pip installs them. Compiled
# to bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, every process would compile its imports again (the
# suite took 39 min instead of 23 without it).
UV_VERSION := 0.13.9
# $(call install,VENV,ARGS): pip install ARGS into VENV, through uv where it can be had
install = $(1)/bin/pip install -q "uv==$(UV_VERSION)" && $(1)/bin/uv pip install --compile-bytecode --python $(1)/bin/python $(2) \
	|| $(1)/bin/pip install $(2)

# constraints.txt: the versions the suite last passed with (a new release on the package index cannot turn CI red)
REQUIREMENTS := -c constraints.txt -e ".[ray,test,review,gcs]"
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(call install,$(VENV),$(REQUIREMENTS))
	touch $@

# Label Studio in its own environment (it pins Django and many others): tests/test_review.py starts it from here
LABEL_STUDIO_VERSION := 1.23.2
LS_VENV := .venv-ls
LS_REQUIREMENTS := -c constraints-label-studio.txt "label-studio==$(LABEL_STUDIO_VERSION)"
$(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION): constraints-label-studio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(call install,$(LS_VENV),$(LS_REQUIREMENTS))
	touch $@

# New versions for both constraint files: resolve pyproject.toml's ranges afresh (a current pip), then `make test`
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q -U pip
	$(LOCK_VENV)/bin/pip install -q -e ".[ray,test,review,gcs]"
	sed -n '/^#/p' constraints.txt > constraints.new
	$(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^fcclip' >> constraints.new && mv constraints.new constraints.txt
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q -U pip
	$(LOCK_VENV)/bin/pip install -q "label-studio==$(LABEL_STUDIO_VERSION)"
	sed -n '/^#/p' constraints-label-studio.txt > constraints.new
	$(LOCK_VENV)/bin/pip freeze >> constraints.new && mv constraints.new constraints-label-studio.txt
	rm -rf $(LOCK_VENV)

.PHONY: install install-label-studio lock demo test test-loop
install: $(VENV)/.installed
install-label-studio: $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)

VOCAB := person; car; dog, puppy; tree [stuff]; sky [stuff]; grass, lawn [stuff]

demo: $(VENV)/.installed
	$(BIN)/fcclip synth images --out demo/images --count 8
	$(BIN)/fcclip label demo/images --out demo/labels --vocab "$(VOCAB)" --model fcclip-tiny --weights random \
		--shard-size 4 --num-cpus 2
	$(BIN)/python examples/label_summary.py demo/labels
	$(BIN)/fcclip predict demo/images/synth_00000.jpg demo/images/synth_00001.jpg --vocab "$(VOCAB)" \
		--model fcclip-tiny --weights random --device cpu --out demo/overlays

# two test files at a time (most of the suite waits on Ray start-ups and subprocesses: 10 CPU minutes of 26 one at a
# time on 2 cores); each file stays on one worker, with its module's local Ray
test: $(VENV)/.installed $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-loop: $(VENV)/.installed  # the round trip alone (it is part of `make test` too)
	$(BIN)/python -m pytest -q -rP --show-capture=stdout -m loop
