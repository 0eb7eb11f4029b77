#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "kernels/cpu/parallel.h"

// The CPU kernels' parallel thresholds lowered for the whole suite (kernels/cpu/parallel.h): the small inputs of the
// tests take the threaded paths too, and the "1 thread against 2" cases compare them with the serial ones.
static const bool kThreadedSmallInputs = (cm::cpu::set_parallel_min(1 << 12, 1 << 12), true);
