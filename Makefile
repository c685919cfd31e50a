# hpc-dfs: the two commands that matter are `make demo` and `make test`.
# Both run `make setup` first (idempotent: apt OpenMPI if missing, .venv, torch, patched Horovod, the package).
#
#   make setup        install everything missing (a second run with nothing to do takes seconds)
#   ENGINE=torch make setup   the same without Horovod (the torch engine only; make test then skips, and names,
#                     the tests that need Horovod)
#   make test         unit + distributed (mpirun -np 2, horovodrun -np 2 --gloo, torchrun --nproc_per_node 2;
#                     both engines) + live-SLURM tests
#   make demo         synth CT -> preprocess (2 ranks) -> train (2 ranks) -> predict -> evaluate -> report
#   make bench        benchmarks in bench/ -> bench/results/*.json (and the fault battery's faults.json)
#   make lock         re-resolve requirements.lock (the versions make setup installs) to the newest allowed
#
# Overridable: TORCH_SPEC (e.g. a CUDA build), VENV, NP (ranks for demo/tests), DEMO (output folder).

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
NP ?= 2
export PATH := $(abspath $(BIN)):$(PATH)
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1
MPIRUN := mpirun --allow-run-as-root --oversubscribe --tag-output -np $(NP) -x PATH -x OMP_NUM_THREADS -x PYTHONUNBUFFERED
HVDRUN := $(BIN)/horovodrun -np $(NP) -H localhost:$(NP) --gloo
TORCHRUN := $(BIN)/torchrun --standalone --nproc_per_node $(NP)
# true where Horovod is installed (a set-up made with ENGINE=torch has none: its Horovod groups say they skip)
HAVE_HOROVOD = $(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("horovod") is None)'
NO_HOROVOD_SKIP = echo "[make test] SKIPPED: $(1): Horovod is not installed here (ENGINE=torch make setup); make setup builds it"
PYTEST := $(PY) -m pytest -p no:cacheprovider --color=no

.PHONY: setup lock bench-faults nnunet-venv quality lint test test-unit test-faults test-dist test-dist-launch test-dist-mpirun \
        test-dist-horovodrun test-dist-torchrun test-dist-mpirun-torch test-slurm \
        demo demo-clean bench help

help:
	@sed -n '1,12p' Makefile

setup:
	@bash .ci/setup.sh

# the newest versions pyproject.toml admits, resolved in a scratch venv -> requirements.lock; then make test, commit
lock:
	@bash .ci/lock.sh

# the nnU-Net v2 peer environment (bench/.venv-nnunet: nnunetv2 on .venv's CPU torch, SimpleITK, surface-distance);
# the export-nnunet and official KiTS23 tests make it themselves when it is missing
nnunet-venv: setup
	@bash bench/nnunet_venv.sh

# ------------------------------------------------------------------------------------------ tests
# a test run leaves the checkout as it found it: tests write under temporary folders, never to tracked files
test: setup
	@bash .ci/tree-state.sh save .tmp-tree-state
	@$(MAKE) --no-print-directory lint test-unit test-faults test-dist test-slurm
	@bash .ci/tree-state.sh check .tmp-tree-state
	@if $(HAVE_HOROVOD); then echo "[make test] all test groups passed: unit, faults, distributed (mpirun -np $(NP), horovodrun -np $(NP) --gloo, torchrun --nproc_per_node $(NP); Horovod and torch engines), slurm"; \
	 else echo "[make test] all test groups passed without Horovod (torch engine only): the skipped tests are listed above (SKIPPED ... needs Horovod)"; fi

lint:
	@echo "[make test] ruff (rules in pyproject.toml)"
	$(PY) -m ruff check hpc_dfs tests bench preprocess

test-unit:
	@echo "[make test] unit tests"
	$(PYTEST) tests/unit -q -m "not distributed and not slurm"

# the fault-injection battery: bad inputs, kill -9, disk full (tmpfs, root), corruption; prints its figure and
# writes it under pytest's temporary folder (make bench-faults records it in bench/results/faults.json)
test-faults:
	@echo "[make test] fault-injection battery (tests/faults)"
	timeout 1200 $(PYTEST) tests/faults -q -m slow

test-dist: test-dist-mpirun test-dist-horovodrun test-dist-torchrun test-dist-mpirun-torch test-dist-launch

# pytest on every rank: a failure on any rank fails the launcher (exit code), output tagged by rank
test-dist-mpirun:
	@if ! $(HAVE_HOROVOD); then $(call NO_HOROVOD_SKIP,SPMD tests under mpirun -np $(NP) with Horovod); exit 0; fi; \
	echo "[make test] distributed SPMD tests under mpirun -np $(NP) (Horovod engine)"; \
	timeout 600 $(MPIRUN) $(PY) -m pytest -p no:cacheprovider --color=no -q tests/distributed/spmd; \
	echo "[make test] distributed (mpirun -np $(NP)): passed"

test-dist-horovodrun:
	@if ! $(HAVE_HOROVOD); then $(call NO_HOROVOD_SKIP,SPMD tests under horovodrun -np $(NP) --gloo); exit 0; fi; \
	echo "[make test] distributed SPMD tests under horovodrun -np $(NP) --gloo"; \
	timeout 600 $(HVDRUN) $(PY) -m pytest -p no:cacheprovider --color=no -q tests/distributed/spmd; \
	echo "[make test] distributed (horovodrun -np $(NP) --gloo): passed"

# the torch engine: torchrun's own rendezvous, and Open MPI's (mpirun with HPC_DFS_ENGINE=torch)
test-dist-torchrun:
	@echo "[make test] distributed SPMD tests under torchrun --nproc_per_node $(NP) (torch engine, Gloo)"
	timeout 600 $(TORCHRUN) -m pytest -p no:cacheprovider --color=no -q tests/distributed/spmd
	@echo "[make test] distributed (torchrun --nproc_per_node $(NP)): passed"

test-dist-mpirun-torch:
	@echo "[make test] distributed SPMD tests under mpirun -np $(NP) with HPC_DFS_ENGINE=torch"
	timeout 600 $(MPIRUN) -x HPC_DFS_ENGINE=torch $(PY) -m pytest -p no:cacheprovider --color=no -q tests/distributed/spmd
	@echo "[make test] distributed (mpirun -np $(NP), torch engine): passed"

# tests that launch whole 2-rank jobs themselves (preprocess, train, predict under every launcher, both engines;
# without Horovod, pytest's summary lists the tests marked horovod as SKIPPED with the reason)
test-dist-launch:
	@echo "[make test] multi-rank job tests (each launches mpirun / horovodrun / torchrun itself)"
	$(PYTEST) tests/distributed -q -m distributed --ignore=tests/distributed/spmd
	@echo "[make test] distributed job tests: passed"

test-slurm: setup
	@echo "[make test] live one-node SLURM tests (installs slurm-wlm + munge if missing)"
	$(PYTEST) tests/slurm -q -m slurm

# ------------------------------------------------------------------------------------------ demo
# Each step writes its output atomically; a second `make demo` skips steps whose output exists.
DEMO ?= demo_out
DEMO_CASES ?= 48
DEMO_TEST_CASES ?= 12
DEMO_PHANTOM ?= 192
DEMO_SIZE ?= 96
DEMO_REFINE ?= --set refine.spacing=auto --set refine.slice_size=64,64 --set refine.margin_mm=12
DEMO_EPOCHS ?= 8
DEMO_TRAIN_ARGS ?= --epochs $(DEMO_EPOCHS) --batch-size 8 --lr 0.002 --num-workers 0 --set model.base_channels=8 --set model.norm=instance --seed 0

demo: setup $(DEMO)/report.html
	@echo "[demo] done. Open $(DEMO)/report.html  (evaluation: $(DEMO)/eval.md)"
	@cat $(DEMO)/eval.md

# phantoms at about 2 mm in-plane ($(DEMO_PHANTOM)^2 over a 320-440 mm field of view): fine enough for the
# tumours to exist at stage 2's spacing (the median native spacing, nnU-Net's full resolution)
$(DEMO)/data/kits.json:
	@echo "[demo] 1/6 synth: $(DEMO_CASES) training phantoms in the KiTS19 layout"
	$(BIN)/hpc-dfs synth --out $(DEMO)/data --cases $(DEMO_CASES) --seed 0 --size $(DEMO_PHANTOM)

# held-out test cases: another seed, another image size and other case ids than the training data
$(DEMO)/test/kits.json:
	@echo "[demo] 1/6 synth: $(DEMO_TEST_CASES) held-out test phantoms"
	$(BIN)/hpc-dfs synth --out $(DEMO)/test --cases $(DEMO_TEST_CASES) --seed 1 --first-case 100 --size $$(( $(DEMO_PHANTOM) - 16 ))

$(DEMO)/shards/manifest.json: $(DEMO)/data/kits.json
	@echo "[demo] 2/6 preprocess on $(NP) ranks -> HDF5 shards (whole slices for stage 1, kidney windows for stage 2)"
	$(MPIRUN) $(BIN)/hpc-dfs preprocess --data $(DEMO)/data --out $(DEMO)/shards --slice-size $(DEMO_SIZE),$(DEMO_SIZE) $(DEMO_REFINE)

# the cascade, both stages in one command: RUN/locate (whole slices) then RUN/refine (kidney windows, 2.5D)
$(DEMO)/run/refine/checkpoints/last.pt: $(DEMO)/shards/manifest.json
	@echo "[demo] 3/6 train the cascade (locate, then refine) on $(NP) ranks (Horovod ring-allreduce)"
	$(MPIRUN) $(BIN)/hpc-dfs train --shards $(DEMO)/shards --out $(DEMO)/run --stage both $(DEMO_TRAIN_ARGS) \
	  $(if $(wildcard $(DEMO)/run/locate/checkpoints/last.pt),--resume,)

$(DEMO)/pred/summary.json: $(DEMO)/run/refine/checkpoints/last.pt $(DEMO)/test/kits.json
	@echo "[demo] 4/6 predict the held-out cases on $(NP) ranks (stage 1, kidney boxes, stage 2)"
	$(MPIRUN) $(BIN)/hpc-dfs predict --checkpoint $(DEMO)/run/locate/checkpoints/best.pt \
	  --refine-checkpoint $(DEMO)/run/refine/checkpoints/best.pt --input $(DEMO)/test --out $(DEMO)/pred --save-raw

$(DEMO)/eval.json: $(DEMO)/pred/summary.json
	@echo "[demo] 5/6 evaluate (KiTS19 Dice, IoU, HD95, surface Dice, tumour detection)"
	$(BIN)/hpc-dfs evaluate --pred $(DEMO)/pred --gt $(DEMO)/test --out $(DEMO)/eval.json

$(DEMO)/clinical/metrics.json: $(DEMO)/data/kits.json
	@echo "[demo] clinical: Clinical-GRU k-fold on the phantoms' kits.json"
	$(BIN)/hpc-dfs clinical --data $(DEMO)/data/kits.json --target malignant --folds 3 --seed 0 --out $(DEMO)/clinical

$(DEMO)/report.html: $(DEMO)/eval.json $(DEMO)/clinical/metrics.json
	@echo "[demo] 6/6 report"
	$(BIN)/hpc-dfs report $(DEMO)/run --pred $(DEMO)/pred --eval $(DEMO)/eval.json --clinical $(DEMO)/clinical --shards $(DEMO)/shards --out $(DEMO)/report.html

demo-clean:
	rm -rf $(DEMO)

# ------------------------------------------------------------------------------------------ bench
bench: setup
	$(BIN)/hpc-dfs bench --all
	@$(MAKE) --no-print-directory bench-faults

# the fault battery's figure, recorded (a complete battery only): bench/results/faults.json
bench-faults: setup
	HPC_DFS_FAULTS_JSON=$(abspath bench/results/faults.json) timeout 1200 $(PYTEST) tests/faults -q -m slow

# segmentation quality on real KiTS19 anatomy, 20 validation cases with 95% intervals: hpc-dfs beside the real
# nnU-Net v2 (its own venv, bench/.venv-nnunet) at 1x, 3x and 9x of a 60 s training budget on the same 2 cores,
# then the ablation at 3x (about 3 h on 2 cores; finished steps are reused by a second run):
# bench/results/quality.json, quality.md and quality_curve.png
quality: setup
	$(BIN)/hpc-dfs bench quality
