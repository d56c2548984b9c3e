// Buffers from Python without copies: anything with the buffer protocol (numpy arrays, bytearray,
// memoryview) or a duck-typed tensor (torch: data_ptr(), numel(), element_size(), is_contiguous(),
// dtype, device), so nothing links libtorch. Every buffer is checked here against what the caller
// needs — C-contiguous, host memory, writable when written, its dtype and its size — and a wrong
// one is an InvalidArgument (kvmanager.InvalidArgument, a ValueError) naming the argument, before
// any pointer is used.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/model_shape.h"
#include "proto/status.h"

namespace kvm::py {

// Raised to Python as the kvmanager.Error subclass of its code (module.cc installs the translator).
struct StatusError {
  Status status;
};
[[noreturn]] inline void Throw(const Status& s) { throw StatusError{s}; }
[[noreturn]] inline void ThrowArg(const std::string& arg, const std::string& what) {
  Throw(Status::InvalidArgument(arg + ": " + what));
}
inline void Check(const Status& s) {
  if (!s.ok()) Throw(s);
}

// A view of a Python buffer for the length of one call. Construct and destroy it with the GIL
// held; the pointer may be used without it (the caller keeps the object alive).
class Buffer {
 public:
  // `writable`: the callee writes into it (a read-only buffer is refused).
  Buffer(pybind11::handle obj, const char* arg, bool writable);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  size_t elem_bytes() const { return elem_; }
  // "fp16", "bf16", "fp32", "u8", "u16", "i32", ... ("?" when the format is unknown).
  const std::string& dtype() const { return dtype_; }
  const char* arg() const { return arg_; }

  // Element type must be `t` (bf16 also accepts 16-bit integer storage, numpy has no bf16).
  void RequireDType(DType t) const;
  // Exactly `n` bytes ("<what>" says what the size is made of).
  void RequireBytes(uint64_t n, const std::string& what) const;

 private:
  const char* arg_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0, elem_ = 0;
  std::string dtype_ = "?";
  Py_buffer view_{};
  bool has_view_ = false;
};

// The address the C++ side would read for `obj` (tests compare it with the array's own).
uintptr_t BufferAddress(pybind11::handle obj);

}  // namespace kvm::py
