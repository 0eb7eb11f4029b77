# ClusterMoE build. `make` builds what this machine can: the CPU engine always; CUDA sources when nvcc is found
# (override with USE_CUDA=0|1, CUDA_ARCH=90); OpenMP when the compiler has it; OpenBLAS only for bench comparisons.
#   make            library, train_lm, sample, tests, bench labs
#   make test       build and run the doctest suite (T=<suite> runs one suite, e.g. T=autograd)
#   make bench      build the bench labs into build/bench/
#   make bench-cpu  rerun the CPU tables of bench/RESULTS.md (train_bench, routing_cost; with PyTorch importable by
#                   $(PYTHON): the side-by-side comparison and the parity check, see bench/reference/README.md)
#   make data       fetch data/tinyshakespeare.txt (checked by SHA-256), or copy it with SRC=path
#   make test CUDA_EMU=1   the same suite with the CUDA code built by g++ against the CPU-hosted emulator in emu/
#                   (its own build folder, build-emu); the cuda suite then runs every case (README, "Testing CUDA
#                   without a GPU")
#   make clean
#   SANITIZE=address,undefined  builds into build-san/ with those sanitizers (-O1, every finding fatal)
CXX       ?= g++
NVCC      ?= nvcc
CUDA_ARCH ?= 90
SHELL     := /bin/bash
CUDA_EMU  ?= 0
BUILD     := build$(if $(filter 1,$(CUDA_EMU)),-emu)$(if $(SANITIZE),-san)
OPT       := $(if $(SANITIZE),-O1,-O3)
CXXFLAGS  := -std=c++17 $(OPT) -march=native -fno-math-errno -Wall -Wextra -I. -MMD -MP
LDFLAGS   :=
LDLIBS    := -lm -lpthread

# SANITIZE=address,undefined: every object and the link get the sanitizers, findings abort the run (no recovery),
# so `make test SANITIZE=...` fails on the first one. -O1 keeps the sanitized build short (CI builds it on 2 cores).
ifneq ($(SANITIZE),)
  SANFLAGS := -fsanitize=$(SANITIZE) -fno-sanitize-recover=all -fno-omit-frame-pointer -g
  CXXFLAGS += $(SANFLAGS)
  LDFLAGS  += $(SANFLAGS)
endif

# ---------------------------------------------------------------- optional parts
HAVE_OPENMP := $(shell echo 'int main(){return 0;}' | $(CXX) -fopenmp -x c++ - -o /dev/null 2>/dev/null && echo 1 || echo 0)
ifeq ($(HAVE_OPENMP),1)
  CXXFLAGS += -fopenmp
  LDFLAGS  += -fopenmp
endif

# CUDA_EMU=1: the CUDA sources and branches are compiled by $(CXX) against emu/ instead of nvcc (no toolkit used).
ifeq ($(CUDA_EMU),1)
  override USE_CUDA := 0
endif
ifeq ($(origin USE_CUDA),undefined)
  USE_CUDA := $(shell command -v $(NVCC) >/dev/null 2>&1 && echo 1 || echo 0)
endif
ifeq ($(USE_CUDA),1)
  CUDA_HOME ?= $(patsubst %/bin/,%,$(dir $(shell command -v $(NVCC))))
  CXXFLAGS  += -DCM_CUDA=1 -I$(CUDA_HOME)/include
  NVCCFLAGS := -std=c++17 -O3 -I. -DCM_CUDA=1 -arch=sm_$(CUDA_ARCH) -Xcompiler -Wall,-Wextra,-fopenmp --expt-relaxed-constexpr -MMD -MP
  LDFLAGS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64
  LDLIBS    += -lcublas -lcudart
endif

ifeq ($(CUDA_EMU),1)
  CXXFLAGS  += -DCM_CUDA=1 -DCM_CUDA_EMU=1 -Iemu/include
endif

HAVE_OPENBLAS := $(shell printf '\043include <cblas.h>\nint main(){return 0;}\n' | $(CXX) -x c++ - -lopenblas -o /dev/null 2>/dev/null && echo 1 || echo 0)

ok = $(if $(filter 1,$(1)),[x],[ ])
$(info $(call ok,1) C++17 CPU engine ($(CXX)))
$(info $(call ok,$(HAVE_OPENMP)) OpenMP)
$(if $(filter 1,$(CUDA_EMU)),$(info [x] CUDA emulated on the CPU (CUDA_EMU=1, build folder $(BUILD))),\
  $(info $(call ok,$(USE_CUDA)) CUDA$(if $(filter 1,$(USE_CUDA)), (sm_$(CUDA_ARCH)),: nvcc not found or USE_CUDA=0)))
$(info $(call ok,$(HAVE_OPENBLAS)) OpenBLAS (bench comparisons only))

# ---------------------------------------------------------------- sources
LIB_SRC  := $(wildcard engine/*.cpp autograd/*.cpp kernels/cpu/*.cpp model/*.cpp)
LIB_OBJ  := $(LIB_SRC:%.cpp=$(BUILD)/%.o)
ifeq ($(USE_CUDA),1)
  CU_SRC := $(wildcard engine/*.cu kernels/cuda/*.cu)
  LIB_OBJ += $(CU_SRC:%.cu=$(BUILD)/%.o)
endif
# The emulator build: every .cu/.cuh is rewritten line for line into $(EMU_GEN) (launch syntax, shared memory;
# emu/cu2cpp.cpp) and compiled as C++ with emu/cuda_emu.h force-included, as nvcc force-includes cuda_runtime.h.
ifeq ($(CUDA_EMU),1)
  CU_SRC   := $(wildcard engine/*.cu kernels/cuda/*.cu)
  EMU_GEN  := $(BUILD)/gen
  EMU_CUH  := $(patsubst %,$(EMU_GEN)/%,$(wildcard kernels/cuda/*.cuh))
  CU2CPP   := $(BUILD)/tools/cu2cpp
  LIB_OBJ  += $(CU_SRC:%.cu=$(BUILD)/%.o) $(patsubst %.cpp,$(BUILD)/%.o,$(wildcard emu/emu.cpp emu/cublas.cpp))
endif
LIB      := $(BUILD)/libcm.a
TEST_SRC := $(wildcard tests/*.cpp)
TEST_OBJ := $(TEST_SRC:%.cpp=$(BUILD)/%.o)
ifeq ($(CUDA_EMU),1)
  TEST_OBJ += $(BUILD)/emu/selftest.o  # the emulator's own tests (suite "emu")
endif
TEST_BIN := $(BUILD)/tests/run_tests
BENCH_SRC := $(wildcard bench/*.cpp)
BENCH_BIN := $(BENCH_SRC:bench/%.cpp=$(BUILD)/bench/%)
ifeq ($(USE_CUDA),1)
  BENCH_CU  := $(wildcard bench/*.cu)
  BENCH_BIN += $(BENCH_CU:bench/%.cu=$(BUILD)/bench/%)
endif
EXP_BIN  := $(BUILD)/bench/experiments/experiments
APP_NAMES := $(patsubst %.cpp,%,$(wildcard train_lm.cpp sample.cpp))
ifeq ($(BUILD),build)
  APP_PAT := %
else  # CUDA_EMU or SANITIZE: the programs stay in their build folder, next to the tests that run them
  APP_PAT := $(BUILD)/bin/%
endif
APPS     := $(APP_NAMES:%=$(APP_PAT))

.PHONY: all test tests bench bench-cpu data clean experiments
all: $(LIB) $(APPS) $(TEST_BIN) $(BENCH_BIN) $(EXP_BIN)

# What `make test` runs, built and not run (CI builds once, then runs suites of it side by side).
tests: $(TEST_BIN) $(APPS)

# Every object depends on the flags it was built with: switching USE_CUDA (or the compiler, or CUDA_ARCH) rebuilds
# everything instead of linking objects of two configurations into one binary.
FLAGS_STAMP := $(BUILD)/flags.txt
FLAGS_NOW   := $(CXX) $(CXXFLAGS) | $(NVCC) $(NVCCFLAGS) | $(USE_CUDA) $(CUDA_ARCH)
$(shell mkdir -p $(BUILD); [ "$$(cat $(FLAGS_STAMP) 2>/dev/null)" = '$(FLAGS_NOW)' ] || echo '$(FLAGS_NOW)' > $(FLAGS_STAMP))

$(BUILD)/%.o: %.cpp $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

ifeq ($(CUDA_EMU),1)
.PRECIOUS: $(EMU_GEN)/%.cpp $(EMU_GEN)/%.cuh
$(CU2CPP): emu/cu2cpp.cpp
	@mkdir -p $(dir $@)
	$(CXX) -std=c++17 -O1 $< -o $@
$(EMU_GEN)/%.cpp: %.cu $(CU2CPP)
	@mkdir -p $(dir $@)
	$(CU2CPP) $< $@
$(EMU_GEN)/%.cuh: %.cuh $(CU2CPP)
	@mkdir -p $(dir $@)
	$(CU2CPP) $< $@
$(BUILD)/%.o: $(EMU_GEN)/%.cpp $(EMU_CUH) $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -Wno-unknown-pragmas -Wno-sign-compare -iquote $(EMU_GEN) -include emu/cuda_emu.h -c $< -o $@
else
$(BUILD)/%.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
endif

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	ar rcs $@ $^

$(APPS): $(APP_PAT): $(BUILD)/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CXX) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(TEST_BIN): $(TEST_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(CXX) $(LDFLAGS) $^ -o $@ $(LDLIBS)

BENCH_LIBS := $(if $(filter 1,$(HAVE_OPENBLAS)),-lopenblas)
$(BUILD)/bench/%.o: bench/%.cpp $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(if $(filter 1,$(HAVE_OPENBLAS)),-DCM_HAVE_OPENBLAS=1) -c $< -o $@
$(BUILD)/bench/%.o: bench/%.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
$(BUILD)/bench/%: $(BUILD)/bench/%.o $(LIB)
	$(CXX) $(LDFLAGS) $^ -o $@ $(LDLIBS) $(BENCH_LIBS)

# doctest's own summary, then the same counts as one plain line ("N passed, N failed"). The crash suite runs the
# built ./train_lm (<build>/bin/train_lm under CUDA_EMU=1 or SANITIZE) as a child process, hence $(APPS).
test: $(TEST_BIN) $(APPS)
	@set -o pipefail; ./$(TEST_BIN) $(if $(T),-ts=$(T)) 2>&1 | tee $(BUILD)/test.log; rc=$$?; \
	  awk '/test cases:/ {for(i=1;i<=NF;i++){if($$i=="passed")p=$$(i-1); if($$i=="failed")f=$$(i-1)}} END {if(p!="") print "tests: " p " passed, " f " failed"}' $(BUILD)/test.log; \
	  exit $$rc

bench: $(BENCH_BIN) $(EXP_BIN)

# The experiments harness (docs/EXPERIMENTS.md, bench/experiments/run.sh): `make experiments` runs the sweep
# (resumable: finished runs are skipped), `make experiments QUICK=1` a few steps per run with its checks (CI).
$(BUILD)/bench/experiments/%.o: bench/experiments/%.cpp $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@
$(EXP_BIN): $(BUILD)/bench/experiments/experiments.o $(LIB)
	$(CXX) $(LDFLAGS) $^ -o $@ $(LDLIBS)
experiments: $(EXP_BIN) $(BUILD)/bench/routing_cost
	bench/experiments/run.sh $(if $(filter 1,$(QUICK)),--quick)

# OMP_WAIT_POLICY=passive: on a machine shared with other jobs, OpenMP's default spin-waiting at barriers made
# steps 10-20x slower and erratic (measured); sleeping waiters cost nothing measurable when the cores are free.
PYTHON ?= python3
BENCH_ENV := OMP_WAIT_POLICY=passive
bench-cpu: $(BUILD)/bench/train_bench $(BUILD)/bench/routing_cost $(BUILD)/bench/dump_batch
	$(BENCH_ENV) ./$(BUILD)/bench/train_bench --device cpu
	$(BENCH_ENV) ./$(BUILD)/bench/routing_cost --device cpu
	@if $(PYTHON) -c 'import torch' 2>/dev/null; then \
	  $(BENCH_ENV) $(PYTHON) bench/reference/compare_train.py --device cpu && \
	  $(PYTHON) bench/reference/check_parity.py --all; \
	else echo "PyTorch is not importable by $(PYTHON): PyTorch tables skipped (make bench-cpu PYTHON=/path/to/venv/bin/python)"; fi

TINYSHAKESPEARE_URL := https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
TINYSHAKESPEARE_SHA := 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
data: data/tinyshakespeare.txt
data/tinyshakespeare.txt:
	@mkdir -p data
	@if [ -n "$(SRC)" ]; then cp "$(SRC)" $@.tmp; \
	 else curl -fsSL $(TINYSHAKESPEARE_URL) -o $@.tmp || wget -q $(TINYSHAKESPEARE_URL) -O $@.tmp || \
	   { rm -f $@.tmp; echo "could not download tinyshakespeare; run 'make data SRC=/path/to/tinyshakespeare.txt'"; exit 1; }; fi
	@echo "$(TINYSHAKESPEARE_SHA)  $@.tmp" | sha256sum -c --quiet - || { rm -f $@.tmp; echo "SHA-256 mismatch: not tinyshakespeare"; exit 1; }
	@mv $@.tmp $@ && echo "data/tinyshakespeare.txt ready (1,115,394 bytes)"

clean:
	rm -rf build build-emu build-san build-emu-san $(APP_NAMES)

-include $(LIB_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(BUILD)/bench/experiments/experiments.d

# ---------------------------------------------------------------- fuzzing (clang + libFuzzer; README "Fuzzing the inputs")
#   make fuzz            build the libFuzzer targets fuzz/*.cpp into build-fuzz/ (ASan + UBSan)
#   make fuzz-run        run each for FUZZ_SECONDS (default 30) on its committed corpus; a finding fails the run
#                        (one target per job: make -j2 fuzz-run runs two at a time)
# A separate build dir and flags: nothing here touches build/. No OpenMP: a fuzz input runs on one thread.
FUZZ_CXX     ?= clang++
FUZZ_BUILD   := build-fuzz
FUZZ_SECONDS ?= 30
FUZZ_FLAGS   := -std=c++17 -O1 -g -I. -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined -MMD -MP
FUZZ_LIB_SRC := $(wildcard engine/*.cpp autograd/*.cpp kernels/cpu/*.cpp model/*.cpp)
FUZZ_LIB_OBJ := $(FUZZ_LIB_SRC:%.cpp=$(FUZZ_BUILD)/%.o)
FUZZ_SRC     := $(wildcard fuzz/*.cpp)
FUZZ_BIN     := $(FUZZ_SRC:fuzz/%.cpp=$(FUZZ_BUILD)/fuzz_%)
FUZZ_RUNS    := $(FUZZ_SRC:fuzz/%.cpp=fuzz-run-%)
.PHONY: fuzz fuzz-run $(FUZZ_RUNS)
.SECONDARY: $(FUZZ_SRC:%.cpp=$(FUZZ_BUILD)/%.o)
fuzz: $(FUZZ_BIN)
$(FUZZ_BUILD)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@
$(FUZZ_BUILD)/libcm_fuzz.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^
$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/fuzz/%.o $(FUZZ_BUILD)/libcm_fuzz.a
	$(FUZZ_CXX) $(FUZZ_FLAGS) -fsanitize=fuzzer $^ -o $@ -lpthread
fuzz-run: $(FUZZ_RUNS)
$(FUZZ_RUNS): fuzz-run-%: $(FUZZ_BUILD)/fuzz_%
	@mkdir -p $(FUZZ_BUILD)/corpus/$*
	@./$< -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_BUILD)/crash-$*- $(FUZZ_BUILD)/corpus/$* fuzz/corpus/$* \
	  > $(FUZZ_BUILD)/$*.log 2>&1 || { tail -n 60 $(FUZZ_BUILD)/$*.log; exit 1; }
	@echo "fuzz $*: $(FUZZ_SECONDS) s, $$(grep -E 'stat::number_of_executed_units' $(FUZZ_BUILD)/$*.log)"

-include $(FUZZ_LIB_OBJ:.o=.d)
