// train_lm: trains ClusterMoE on a text (or any byte) file. `make && ./train_lm` runs the cpu preset on
// data/tinyshakespeare.txt; `./train_lm --help` lists every flag. The loop is model/trainer.cpp.
#include <iostream>

#include "model/trainer.h"

int main(int argc, char** argv) {
  cm::reexec_with_passive_openmp(argv);
  return cm::run_train_lm(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
