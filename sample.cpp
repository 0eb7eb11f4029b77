// sample: continues a prompt with a checkpoint written by train_lm, using the expert-selection cache (per-layer
// KV cache and cached routing decisions), and reports the tokens/s it achieved.
//   ./sample --ckpt out/ckpt_00002000.safetensors --prompt "ROMEO:" --max_new_tokens 300 --temperature 0.8
// The work is run_sample in model/trainer.cpp.
#include <iostream>

#include "model/trainer.h"

int main(int argc, char** argv) {
  cm::reexec_with_passive_openmp(argv);
  return cm::run_sample(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
