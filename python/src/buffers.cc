#include "buffers.h"

#include <cstring>

namespace kvm::py {
namespace pyb = pybind11;

namespace {

std::string FormatDType(const char* fmt, size_t itemsize) {
  if (!fmt) return itemsize == 1 ? "u8" : "?";
  while (*fmt == '@' || *fmt == '=' || *fmt == '<' || *fmt == '!') ++fmt;  // native/little endian
  if (fmt[0] == 0 || fmt[1] != 0) return "?";
  switch (fmt[0]) {
    case 'e':
      return "fp16";
    case 'f':
      return "fp32";
    case 'd':
      return "fp64";
    case 'B':
    case 'c':
      return "u8";
    case 'b':
      return "i8";
    case 'H':
      return "u16";
    case 'h':
      return "i16";
    case 'I':
      return "u32";
    case 'i':
      return itemsize == 4 ? "i32" : "?";
    case 'l':
    case 'q':
      return itemsize == 8 ? "i64" : "?";
    case 'L':
    case 'Q':
      return itemsize == 8 ? "u64" : "?";
    default:
      return "?";
  }
}

std::string TorchDType(const std::string& s) {  // str(tensor.dtype)
  if (s == "torch.float16") return "fp16";
  if (s == "torch.bfloat16") return "bf16";
  if (s == "torch.float32") return "fp32";
  if (s == "torch.float64") return "fp64";
  if (s == "torch.uint8") return "u8";
  if (s == "torch.int8") return "i8";
  if (s == "torch.int16") return "i16";
  if (s == "torch.int32") return "i32";
  if (s == "torch.int64") return "i64";
  return "?";
}

}  // namespace

Buffer::Buffer(pyb::handle obj, const char* arg, bool writable) : arg_(arg) {
  if (obj.is_none()) ThrowArg(arg, "a buffer (numpy array or CPU tensor) is required, got None");
  if (PyObject_CheckBuffer(obj.ptr())) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      ThrowArg(arg, "its buffer cannot be exported with strides and format");
    }
    has_view_ = true;
    if (writable && view_.readonly)
      ThrowArg(arg, "read-only buffer (results are written into it: pass a writable array)");
    if (!PyBuffer_IsContiguous(&view_, 'C'))
      ThrowArg(arg, "not C-contiguous (pass a contiguous array, e.g. numpy.ascontiguousarray)");
    ptr_ = view_.buf;
    bytes_ = size_t(view_.len);
    elem_ = size_t(view_.itemsize);
    dtype_ = FormatDType(view_.format, elem_);
    return;
  }
  if (pyb::hasattr(obj, "data_ptr") && pyb::hasattr(obj, "numel") &&
      pyb::hasattr(obj, "element_size") && pyb::hasattr(obj, "is_contiguous")) {
    if (pyb::hasattr(obj, "device")) {
      pyb::object dev = obj.attr("device");
      std::string type = pyb::hasattr(dev, "type") ? pyb::str(dev.attr("type")).cast<std::string>()
                                                   : pyb::str(dev).cast<std::string>();
      if (type != "cpu")
        ThrowArg(arg, "a tensor on device '" + type +
                          "': kvmanager reads and writes host memory (pass a CPU tensor)");
    }
    if (!obj.attr("is_contiguous")().cast<bool>())
      ThrowArg(arg, "not contiguous (pass tensor.contiguous())");
    const auto numel = obj.attr("numel")().cast<int64_t>();
    const auto esz = obj.attr("element_size")().cast<int64_t>();
    if (numel < 0 || esz <= 0) ThrowArg(arg, "bad numel() or element_size()");
    ptr_ = reinterpret_cast<void*>(obj.attr("data_ptr")().cast<uintptr_t>());
    bytes_ = size_t(numel) * size_t(esz);
    elem_ = size_t(esz);
    if (pyb::hasattr(obj, "dtype")) dtype_ = TorchDType(pyb::str(obj.attr("dtype")));
    if (ptr_ == nullptr && bytes_ > 0) ThrowArg(arg, "data_ptr() is null");
    return;
  }
  ThrowArg(arg, std::string("expected a numpy array, a CPU tensor or another buffer, got ") +
                    Py_TYPE(obj.ptr())->tp_name);
}

Buffer::~Buffer() {
  if (has_view_) PyBuffer_Release(&view_);
}

void Buffer::RequireDType(DType t) const {
  const std::string want = DTypeName(t);
  if (dtype_ == want) return;
  if (t == DType::kBF16 && (dtype_ == "u16" || dtype_ == "i16")) return;
  ThrowArg(arg_, "dtype " + dtype_ + ", the sequence stores " + want);
}

void Buffer::RequireBytes(uint64_t n, const std::string& what) const {
  if (bytes_ != n)
    ThrowArg(arg_, "holds " + std::to_string(bytes_) + " bytes, expected " + std::to_string(n) +
                       " (" + what + ")");
}

uintptr_t BufferAddress(pyb::handle obj) {
  Buffer b(obj, "obj", false);
  return reinterpret_cast<uintptr_t>(b.data());
}

}  // namespace kvm::py
