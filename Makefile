# intent-worker: `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data
DATASET ?= .cache/datasets/dev
TRAFFIC ?= .cache/datasets/traffic
TRAFFIC_REST ?= .cache/datasets/traffic-rest
TRAFFIC_ALL ?= .cache/datasets/traffic-all
TEMPLATES ?= .cache/datasets/templates
ML ?= build/students-ml
# Torch device for labelling and training: cpu, or cuda (labels all the traffic in a minute).
DEVICE ?= cpu
STUDENTS ?= build/students
LEVERS ?= build/levers

.DEFAULT_GOAL := help

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[teacher,services,train,dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the package with every extra (teacher, services, train, dev)

run: setup ## Run the worker on embedded Kafka + Redis; then `intent-worker send` / `tail` in other shells
	$(BIN)/intent-worker run

test: setup ## Set up and run the whole test suite
	$(BIN)/python -m pytest -q

lint: setup ## ruff, and the import layering (import-linter contracts in pyproject.toml)
	$(BIN)/ruff check worker tests benchmarks
	$(BIN)/lint-imports --no-cache

typecheck: setup ## mypy --strict on worker/
	$(BIN)/mypy

teacher: setup ## Re-fit the teacher head on ../shared/data and rewrite models/teacher/
	$(BIN)/intent-worker teacher fit --out models/teacher

teacher-build: setup ## Build (or verify) the cached teacher encoder
	$(BIN)/intent-worker teacher build

teacher-eval: setup ## Evaluate the teacher on the MASSIVE and xSID validation splits
	$(BIN)/intent-worker teacher eval --split validation --data $(SHARED_DATA)/massive/*.jsonl $(SHARED_DATA)/xsid/*.jsonl

corpus: setup ## Label MASSIVE train + Tatoeba with the teacher into $(DATASET)
	$(BIN)/intent-worker corpus build --device $(DEVICE) --out $(DATASET)

traffic: setup ## Label 6,000 rows per language of ../shared/data/traffic with the teacher into $(TRAFFIC) (resumable)
	$(BIN)/intent-worker corpus build --device $(DEVICE) --data $(SHARED_DATA)/traffic/*.jsonl --per-file 6000 --out $(TRAFFIC)

traffic-rest: setup ## Label the next 20,000 rows of each traffic file (those `make loop-demo` replays) into $(TRAFFIC_REST) (~7 min on 2 cores)
	$(BIN)/intent-worker corpus build --device $(DEVICE) --data $(SHARED_DATA)/traffic/*.jsonl --skip-per-file 6000 \
		--per-file 20000 --out $(TRAFFIC_REST)

templates: setup ## Label our seed templates (worker/loop/templates.py: alarms and reminders, music, restaurants, weather, films, books), up to 300 expansions per domain in each of the 18 languages, into $(TEMPLATES) (~2 min)
	$(BIN)/intent-worker corpus build --device $(DEVICE) --templates 300 --out $(TEMPLATES)

traffic-all: setup ## Label all 315,745 traffic rows into $(TRAFFIC_ALL) (resumable; hours on 2 cores, a minute with DEVICE=cuda)
	$(BIN)/intent-worker corpus build --device $(DEVICE) --data $(SHARED_DATA)/traffic/*.jsonl --out $(TRAFFIC_ALL)

# The CNN students' recipe; the levers (`make levers`) change one thing each of STUDENT_RECIPE, on the
# data the earlier defaults were trained on.
CNN_RECIPE := --arch cnn --embedding-dim 256 --kernels 2,3,4,5 --filters 160 --min-count 2 \
	--patience 2 --plateau-factor 0.5 --min-delta 0.002 --batch-size 256 --lr 0.0015 --sparse-embeddings
STUDENT_RECIPE := $(CNN_RECIPE) --epochs 5 --data $(DATASET) $(TRAFFIC)

# Earlier defaults, read from git: cnn-17f196dba1 (STUDENT_RECIPE from scratch, 3ef9fe3) and
# cnn-5b1833b2fa (it warm-started around its table snapped to 4 bits, 764056e: the loop demo's
# generation 0, which never saw the traffic after `make traffic`'s rows).
SCRATCH_STUDENT := build/git-students/3ef9fe3
PREVIOUS_STUDENT := build/git-students/764056e
build/git-students/%/card.json:
	mkdir -p $(@D)
	for f in model.onnx tokenizer.json labels.json card.json; do \
		git show $*:models/student/$$f > $(@D)/$$f; done

student: corpus traffic traffic-rest templates ## Reproduce the shipped multilingual student in models/student: the CNN recipe from scratch on the development corpus, the first 26,000 rows of each traffic file and our alarm and reminder templates, 8 epochs, then 2 around its 4-bit table, seed 1 (~27 min of training on 2 cores)
	$(BIN)/intent-worker train $(CNN_RECIPE) --epochs 8 --table-bits 4 --threads 2 --seed 1 \
		--data $(TRAFFIC_REST) $(DATASET) $(TRAFFIC) $(TEMPLATES) --out models/student
	rm -f models/student/fp32.onnx

levers: corpus traffic $(SCRATCH_STUDENT)/card.json ## The shipped student's recipe with one lever each, into $(LEVERS): disagreement-weighted rows, the sentence-embedding target, the 4-bit table; smaller pruned students; and the CPU cascades (~2.5 h on 2 cores)
	$(BIN)/intent-worker train $(STUDENT_RECIPE) --disagreement-student $(SCRATCH_STUDENT) --out $(LEVERS)/disagreement
	$(BIN)/intent-worker train $(STUDENT_RECIPE) --embedding-weight 1 --out $(LEVERS)/embedding
	$(BIN)/intent-worker train $(STUDENT_RECIPE) --init-from $(SCRATCH_STUDENT) --epochs 0 --table-bits 4 \
		--out $(LEVERS)/cnn-4bit
	$(BIN)/intent-worker train --arch pruned --layers 0,11 --mode distil --epochs 1 --batch-size 128 --lr 1e-4 \
		--min-count 2 --data $(DATASET) $(TRAFFIC) --out $(LEVERS)/pruned-0-11
	$(BIN)/intent-worker train --arch pruned --layers 0,11 --mode distil --epochs 1 --batch-size 128 --lr 1e-4 \
		--min-count 4 --data $(DATASET) $(TRAFFIC) --out $(LEVERS)/pruned-0-11-mc4
	$(BIN)/intent-worker train --arch pruned --layers 0 --mode distil --epochs 1 --batch-size 128 --lr 1e-4 \
		--min-count 4 --data $(DATASET) $(TRAFFIC) --out $(LEVERS)/pruned-0-mc4
	$(BIN)/intent-worker cascade $(SCRATCH_STUDENT) $(LEVERS)/pruned-0-11 --escalate-below 0.1 --out $(LEVERS)/cascade-0.1
	$(BIN)/intent-worker cascade $(LEVERS)/cnn-4bit $(LEVERS)/pruned-0-11 --escalate-below 0.1 \
		--out $(LEVERS)/cascade-4bit

cascade: corpus traffic-all ## The all-traffic students and their cascade into $(ML): cnn, pruned-0-11, cascade (DEVICE=cuda: ~10 min; hours on 2 cores)
	$(BIN)/intent-worker train --arch cnn --embedding-dim 256 --kernels 2,3,4,5 --filters 192 --min-count 3 \
		--epochs 6 --patience 3 --plateau-factor 0.5 --min-delta 0.002 --batch-size 256 --lr 0.0015 \
		--sparse-embeddings --device $(DEVICE) --threads $$(nproc) --data $(DATASET) $(TRAFFIC_ALL) --out $(ML)/cnn
	$(BIN)/intent-worker train --arch pruned --layers 0,11 --mode distil --epochs 1 --batch-size 128 --lr 1e-4 \
		--device $(DEVICE) --threads $$(nproc) --data $(DATASET) $(TRAFFIC_ALL) --out $(ML)/pruned-0-11
	$(BIN)/intent-worker cascade $(ML)/cnn $(ML)/pruned-0-11 --escalate-below 0.1 --out $(ML)/cascade

bench-multilingual: setup ## Per-language agreement (xSID, MASSIVE, held-back traffic of all rows, smoke fixture) of models/student: benchmarks/results/multilingual.*
	$(BIN)/python benchmarks/multilingual.py --traffic $(TRAFFIC_ALL) models/student

bench-embedding-bits: setup ## 4-bit embedding tables against INT8 for models/student and $(LEVERS)/*: size, parity, p50: benchmarks/results/embedding_4bit.json
	$(BIN)/python benchmarks/embedding_bits.py models/student $(wildcard $(LEVERS)/disagreement $(LEVERS)/embedding)

bench-cascade: setup ## Cascade of $(ML)/cnn and $(ML)/pruned-0-11: agreement, escalation and mean cost per threshold and language: benchmarks/results/cascade.*
	$(BIN)/python benchmarks/cascade.py --traffic $(TRAFFIC_ALL) $(ML)/cnn $(ML)/pruned-0-11

VOLUME ?= build/volume
volume: corpus traffic $(SCRATCH_STUDENT)/card.json ## The volume curve: STUDENT_RECIPE (cnn-17f196dba1's) from scratch on 10/25/50% of its rows (100% is that default) into $(VOLUME) (~15 min on 2 cores)
	mkdir -p $(VOLUME) && rm -rf $(VOLUME)/cnn && cp -r $(SCRATCH_STUDENT) $(VOLUME)/cnn
	for f in 0.1 0.25 0.5; do [ -f $(VOLUME)/cnn-frac$$f/card.json ] || \
		$(BIN)/intent-worker train $(STUDENT_RECIPE) --fraction $$f --out $(VOLUME)/cnn-frac$$f || exit 1; done

students: corpus ## Train every student of the comparison into $(STUDENTS)
	bash benchmarks/train_students.sh $(DATASET) $(STUDENTS)

bench: setup ## Run the benchmarks; results go to benchmarks/results/
	$(BIN)/python benchmarks/teacher.py
	$(BIN)/python benchmarks/students.py --models $(STUDENTS)

bench-pruned: setup ## Pruned-transformer students vs teacher, cnn, bag (trains missing ones into build/pruned; needs `make student students`): benchmarks/results/pruned.*
	$(BIN)/python benchmarks/pruned.py --data $(DATASET) --models build/pruned --cnn models/student --bag $(STUDENTS)/bag

bench-worker: setup ## Worker must-shows (throughput vs raw/Faust ceilings, latency, scaling, bad input, Redis outage, fresh start; ~17 min): benchmarks/results/worker.json
	$(BIN)/python benchmarks/bench_worker.py

bench-faults: setup ## Faults survived on real Tansu, valkey, worker and labeller processes (broker frozen/restarted, worker/labeller killed, Redis frozen, poison pills, bad inputs; ~10 min): benchmarks/results/faults.json
	$(BIN)/python benchmarks/faults.py

loop-demo: corpus traffic $(PREVIOUS_STUDENT)/card.json ## The loop on multilingual traffic, real services: replay traffic gen 0 never saw through it, sample, label, train gen 1 (warm-started, on the buffer + gen 0's datasets), gate per language, promote + rollback under traffic (~15 min on 2 cores): benchmarks/results/flywheel.json
	$(BIN)/python benchmarks/flywheel.py --gen0 $(PREVIOUS_STUDENT)

bench-zero-shot: setup ## Zero-shot teachers (e5 on the label sets in models/labels) beside the trained head, MASSIVE + xSID validation (~2 min): benchmarks/results/zero_shot.json
	$(BIN)/python benchmarks/zero_shot.py

label-set-demo: corpus ## A new label set through the loop on real services: zero-shot labelling, training, promote --new-label-set and rollback under traffic (~15 min): benchmarks/results/label_set_loop.json
	$(BIN)/python benchmarks/label_set_loop.py

clean: ## Remove the virtualenv and caches (not the teacher cache in ~/.cache)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: help setup run test lint typecheck teacher teacher-build teacher-eval corpus traffic traffic-all templates student levers cascade bench-multilingual bench-embedding-bits bench-cascade students bench bench-pruned bench-worker bench-faults loop-demo bench-zero-shot label-set-demo clean
