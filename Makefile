# aigw — top-level build. `make run` and `make test` are the two commands a
# user needs; both install missing Debian packages first (deploy/deps.sh).
#
#   make            build everything into build/
#   make run        build and start the whole gateway on :8080
#   make test       selftests (plain and ASan+UBSan), fuzz smoke, Python and
#                   integration tests
#   make bench      benchmarks (not tests); results go to docs/PERFORMANCE.md
#   make fuzz       every libFuzzer target for FUZZ_TIME seconds each
#   make lint       clang-format check and cppcheck on the project's C
#   make SAN=1 ...  the same build with ASan+UBSan, into build-san/

SHELL      := /bin/bash
SAN        ?= 0
BUILD      ?= build
O          := $(if $(filter 1,$(SAN)),$(BUILD)-san,$(BUILD))
CC         ?= cc
PKGS       := libczmq libzmq msgpack hiredis libpq libcurl sqlite3 openssl
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lcivetweb -lm -lpthread
WARN       := -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow -Wstrict-prototypes
SANFLAGS   := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
SANLINK    := -fsanitize=address,undefined
OPT        := $(if $(filter 1,$(SAN)),$(SANFLAGS),-O2 -g)
CFLAGS     := -std=gnu11 $(WARN) $(OPT) -D_GNU_SOURCE -Iproto -Ibroker $(PKG_CFLAGS)
LDFLAGS    := $(if $(filter 1,$(SAN)),$(SANLINK),)
SHARED     ?= $(abspath ../shared)
PYTHON     := /usr/bin/python3
FUZZ_TIME  ?= 20

# Classes: every .c that is not a program main (mains are named aigw_*.c).
DIRS       := proto broker $(wildcard services/*) edge
MAINS_ALL  := $(foreach d,$(DIRS),$(wildcard $(d)/aigw_*.c))
CLASS_SRC  := $(filter-out $(MAINS_ALL),$(foreach d,$(DIRS),$(wildcard $(d)/*.c)))
MAIN_SRC   := $(foreach d,$(DIRS) tests/c,$(wildcard $(d)/aigw_*.c))
CLASS_OBJ  := $(patsubst %.c,$(O)/obj/%.o,$(CLASS_SRC))
PROGRAMS   := $(foreach m,$(MAIN_SRC),$(O)/$(subst _,-,$(basename $(notdir $(m)))))
HEADERS    := $(foreach d,$(DIRS),$(wildcard $(d)/*.h))
FUZZ_SRC   := $(wildcard tests/fuzz/fuzz_*.c)
FUZZERS    := $(patsubst tests/fuzz/%.c,build-fuzz/%,$(FUZZ_SRC))

.PHONY: all deps run test test-steps selftest selftest-san integration python-test models bench fuzz fuzz-smoke clean format lint
.DEFAULT_GOAL := all

all: $(PROGRAMS)

deps:
	@deploy/deps.sh

$(O)/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# The selftest table, generated from every gw_<class>_test declaration.
$(O)/gen/selftests.inc: $(HEADERS)
	@mkdir -p $(dir $@)
	@names=$$(grep -ho 'gw_[a-z0-9_]*_test (bool verbose)' $(HEADERS) | sed 's/ (bool verbose)//' | sort -u); \
	{ for n in $$names; do echo "void $$n (bool verbose);"; done; \
	  echo "static const test_t s_tests[] = {"; \
	  for n in $$names; do s=$${n#gw_}; echo "    {\"$${s%_test}\", $$n},"; done; \
	  echo "};"; } > $@.tmp && mv $@.tmp $@

$(O)/aigw-selftest: CFLAGS += -I$(O)/gen
# The co-located gateway includes every stage's header.
$(O)/aigw-gateway: CFLAGS += $(addprefix -I,$(DIRS))
$(O)/aigw-selftest: $(O)/gen/selftests.inc

$(O)/libaigw.a: $(CLASS_OBJ)
	@rm -f $@
	ar rcs $@ $^

# Program mains: dir/aigw_name.c -> $(O)/aigw-name
define PROGRAM_RULE
$(O)/$(subst _,-,$(basename $(notdir $(1)))): $(1) $(O)/libaigw.a $(HEADERS)
	$$(CC) $$(CFLAGS) $(1) -o $$@ $(O)/libaigw.a $$(LDFLAGS) $$(PKG_LIBS)
endef
$(foreach m,$(MAIN_SRC),$(eval $(call PROGRAM_RULE,$(m))))

run: deps all models
	@deploy/run.sh

# The tiny demo/test models (random weights, real tokenizer files), made
# reproducibly by a script; rebuilt only when the script changes.
models: var/models/.stamp
var/models/.stamp: python/aigw_models/make_tiny.py
	$(PYTHON) python/aigw_models/make_tiny.py
	@touch $@

selftest: deps all
	AIGW_TESTDATA=$(SHARED)/testdata $(O)/aigw-selftest

selftest-san:
	@$(MAKE) --no-print-directory SAN=1 all
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    AIGW_TESTDATA=$(SHARED)/testdata $(BUILD)-san/aigw-selftest

integration: deps all models
	AIGW_BUILD=$(abspath $(O)) AIGW_TESTDATA=$(SHARED)/testdata \
	    $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

python-test: deps all models
	AIGW_BUILD=$(abspath $(O)) $(PYTHON) -m pytest -q -p no:cacheprovider python/tests

# Every test step runs with throwaway PostgreSQL and Redis servers on free
# loopback ports (tests/harness/services.sh); AIGW_REQUIRE_SERVICES makes a
# test that needs them fail, not skip, if they are missing.
test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory lint
	@AIGW_REQUIRE_SERVICES=1 tests/harness/services.sh $(MAKE) --no-print-directory test-steps

test-steps:
	@$(MAKE) --no-print-directory selftest
	@$(MAKE) --no-print-directory selftest-san
	@$(MAKE) --no-print-directory fuzz-smoke
	@$(MAKE) --no-print-directory python-test
	@$(MAKE) --no-print-directory integration

bench: deps all
	@tests/bench/run.sh

# Fuzz targets link the bus-level classes (proto/, broker/), compiled once
# with the fuzzer's instrumentation.
FUZZ_CFLAGS := -std=gnu11 -g -O1 -D_GNU_SOURCE -Iproto -Ibroker $(PKG_CFLAGS)
FUZZ_OBJ    := $(patsubst %.c,build-fuzz/obj/%.o,$(filter proto/% broker/%,$(CLASS_SRC)))
.SECONDARY: $(FUZZ_OBJ)

build-fuzz/obj/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,address,undefined -c $< -o $@

build-fuzz/%: tests/fuzz/%.c $(FUZZ_OBJ)
	clang $(FUZZ_CFLAGS) -fsanitize=fuzzer,address,undefined $< $(FUZZ_OBJ) -o $@ $(PKG_LIBS)
# (fuzz_usage_batch includes billing's parser source)
build-fuzz/fuzz_usage_batch: services/billing/gw_billing.c

# In make test: every fuzz target builds and replays its seed corpus, then
# runs FUZZ_SMOKE_RUNS mutated inputs (make fuzz runs them for FUZZ_TIME).
FUZZ_SMOKE_RUNS ?= 20000
fuzz-smoke: $(FUZZERS)
	@set -e; for f in $(FUZZERS); do \
	    n=$$(basename $$f); mkdir -p build-fuzz/smoke/$$n; \
	    if ! ASAN_OPTIONS=allocator_may_return_null=1:max_allocation_size_mb=256 \
	        $$f -runs=$(FUZZ_SMOKE_RUNS) -max_len=65536 -print_final_stats=1 -artifact_prefix=build-fuzz/ \
	        build-fuzz/smoke/$$n tests/fuzz/seeds/$$n >build-fuzz/$$n.smoke.log 2>&1; then \
	        tail -n 60 build-fuzz/$$n.smoke.log; echo "fuzz-smoke: $$n FAILED"; exit 1; fi; \
	    echo "fuzz-smoke: $$n ok ($$(grep -h 'stat::number_of_executed_units' build-fuzz/$$n.smoke.log | awk '{print $$2}') inputs)"; \
	done

fuzz: deps $(FUZZERS)
	@set -e; for f in $(FUZZERS); do \
	    n=$$(basename $$f); mkdir -p build-fuzz/corpus/$$n tests/fuzz/seeds/$$n; \
	    echo "fuzz: $$n for $(FUZZ_TIME)s"; \
	    if ! ASAN_OPTIONS=allocator_may_return_null=1:max_allocation_size_mb=256 \
	        $$f -max_total_time=$(FUZZ_TIME) -max_len=65536 -print_final_stats=1 -artifact_prefix=build-fuzz/ \
	        build-fuzz/corpus/$$n tests/fuzz/seeds/$$n >build-fuzz/$$n.log 2>&1; then \
	        tail -n 60 build-fuzz/$$n.log; echo "fuzz: $$n FAILED"; exit 1; fi; \
	    grep -h 'stat::number_of_executed_units' build-fuzz/$$n.log; \
	done

C_FILES    := $(foreach d,$(DIRS) tests/c tests/fuzz,$(wildcard $(d)/*.[ch]))

format:
	clang-format -i $(C_FILES)

# Static checks on the project's own code: formatting and cppcheck.
lint:
	@clang-format --dry-run --Werror $(C_FILES) && echo "lint: clang-format clean"
	@cppcheck --quiet --enable=warning,portability --std=c11 --inline-suppr --error-exitcode=1 \
	    -D__GNUC__ -Iproto -Ibroker --suppress=missingIncludeSystem \
	    --suppress=assertWithSideEffect $(filter %.c,$(C_FILES)) && echo "lint: cppcheck clean"

clean:
	rm -rf build build-san build-fuzz
