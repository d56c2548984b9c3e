// What the CPU this runs on can do (attention/ internal).
#pragma once

namespace kvm::attn {
// AVX2, FMA and F16C (CPUID), checked once.
bool HaveAvx2();
}  // namespace kvm::attn
