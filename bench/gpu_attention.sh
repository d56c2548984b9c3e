#!/usr/bin/env bash
# GPU checks on a lent device machine (nvcc + CMake, no Debian packages): builds the kernels-only tree
# with GoogleTest from sources carried in .gtest-src/, runs the CUDA tests against the CPU reference
# (attention kernels, the GPU tier of the block store) and the decode and scoring benchmarks. About 5
# minutes. Prepare on the build machine once:
#   cp -r /usr/src/googletest .gtest-src      (git-ignored; carry it: run(carry=[".gtest-src"]))
# Then on the device:  bash bench/gpu_attention.sh   (writes $OUT/gpu_attention.txt when OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}/gpu_attention.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DKVM_KERNELS_ONLY=ON -DKVM_WITH_CUDA=ON \
  -DKVM_GTEST_SOURCE="$PWD/.gtest-src" -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build build-gpu -j"$(nproc)" --target attention_cuda_test attention_decode_test gpu_tier_test \
  kvm_gpu_decode_bench kvm_gpu_score_bench 2>&1 | tail -3
./build-gpu/tests/attention_cuda_test 2>&1 | tail -5 | tee -a "$out"
./build-gpu/tests/attention_decode_test 2>&1 | tail -2 | tee -a "$out"
./build-gpu/tests/gpu_tier_test 2>&1 | tail -4 | tee -a "$out"
./build-gpu/bench/kvm_gpu_decode_bench --hbm-gbps 4800 | tee -a "$out"
./build-gpu/bench/kvm_gpu_score_bench | tee -a "$out"
