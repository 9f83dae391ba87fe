# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each creates its virtual environment on a fresh machine if it is missing or out of date.
#
# TORCH picks the tested set of versions in constraints/torch-$(TORCH).txt: 2.15 (the default, in .venv) or 2.14
# (in .venv-torch2.14). The set is passed as PIP_CONSTRAINT, which replaces any machine-wide pip constraint (a
# pip.conf that caps torch), so the same commit gets the same versions on every machine.
TORCH          ?= 2.15
SUPPORTED      := 2.14 2.15
OTHER_TORCH    := 2.14
VENV           ?= $(if $(filter 2.15,$(TORCH)),.venv,.venv-torch$(TORCH))
PYTHON         ?= python3
PY             := $(VENV)/bin/python
CONSTRAINTS    := constraints/torch-$(TORCH).txt
STAMP          := $(VENV)/.peft-dist-installed
TESTS          ?= tests
# What depends on the torch minor: engines, estimator, SNELL's autograd kernels, SNELLA, checkpoints (the
# state-dict API that reshards), bf16 precision, FSDP2's 2-D mesh (HSDP, with the dry run's bytes on it) and
# sharded initialization (a TorchDispatchMode recording replayed over DTensor shards). Run once, under the default
# torch (CI's time budget): SNELL's method tests, the data loaders, the fake-process-group dry runs, the test
# harness, run safety (trainer paths), every method under ZeRO-3 (ZeRO-3 itself runs under both in test_ddp and
# test_sharded_init) and the ViT-B start-up memory test.
VERSION_TESTS  := tests/test_engines.py tests/test_ddp.py tests/test_memory_estimator.py \
                  tests/test_snell_kernel.py tests/test_snella.py tests/test_checkpoint.py \
                  tests/test_activation_checkpointing.py tests/test_memory_profiler.py tests/test_compat.py \
                  tests/test_precision.py tests/test_hsdp.py tests/test_sharded_init.py tests/test_fp16_amp.py \
                  tests/test_ema.py
VERSION_SKIPS  := tests/test_engines.py::test_every_method_under_zero3 \
                  tests/test_sharded_init.py::test_vit_b_startup_memory_per_rank
# DeepSpeed on a machine without a GPU: its CPU accelerator (no compiled ops needed at install time).
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0

.PHONY: env env-other-torch demo test test-other-torch lock clean

ifeq ($(filter $(TORCH),$(SUPPORTED)),)
$(error TORCH=$(TORCH); allowed: $(SUPPORTED))
endif

env: $(STAMP)

# torch + torchvision come from the package registry: PyPI's torchvision only loads against PyPI's torch build
# (a CUDA build, which runs fine on a CPU-only machine). Then the package with every extra the tests exercise.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m pip install --quiet torch torchvision
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m pip install --quiet -e ".[dev,deepspeed,legacy]"
	$(PY) -m peft_dist.compat --check $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peft-dist demo --out-dir runs/demo

# The tests run in xdist workers, so a native crash fails that test and a new worker runs the rest. Two workers on
# a 2-core machine: with one, the suite keeps only about 1.2-1.5 cores busy on average (process start-up,
# rendezvous, SLURM jobs wait more than they compute). The SLURM tests share one cluster and run in one worker
# (--dist loadgroup, tests/conftest.py).
TEST_WORKERS   ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart=20 $(TESTS)

# The version-dependent tests under the other supported torch minor, in its own environment (CI runs both).
env-other-torch:
	$(MAKE) env TORCH=$(OTHER_TORCH)

test-other-torch:
	$(MAKE) test TORCH=$(OTHER_TORCH) TESTS="$(VERSION_TESTS) $(addprefix --deselect ,$(VERSION_SKIPS))"

# Re-resolve the tested set for TORCH from pyproject.toml's ranges (then run both test targets before committing).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	printf 'torch==%s.*\ntorchvision\n' $(TORCH) > .venv-lock/torch.txt
	PIP_CONSTRAINT=$(abspath .venv-lock/torch.txt) .venv-lock/bin/pip install --quiet torch torchvision -e ".[dev,deepspeed,legacy]"
	{ echo "# The tested set for torch $(TORCH) (pip freeze of \`make lock TORCH=$(TORCH)\`, Python 3.11, x86_64)."; \
	  echo "# Used as PIP_CONSTRAINT by the Makefile; regenerate with \`make lock TORCH=$(TORCH)\`."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^peft-dist'; } > $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf .venv .venv-torch* runs
