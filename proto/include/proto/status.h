// Status and Result<T>: the one error convention at every boundary of kvmanager.
//
// A Status is OK or carries a StatusCode and a message. It is cheap when OK (one null pointer), so
// it can be returned from hot paths. Result<T> holds either a value or a non-OK Status.
//
// StatusCode values are the wire error codes: they travel in frames (proto/wire) and are never
// renumbered; new codes are only appended. tests/proto/status_test.cc checks that the protobuf enum
// ErrorCode in kvm.proto mirrors this one exactly.
//
// Thread safety: distinct objects may be used from distinct threads; a const object may be shared.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace kvm {

// Wire error codes. NEVER renumber; append only.
enum class StatusCode : uint32_t {
  kOk = 0,
  kInvalidArgument = 1,     // the request is malformed or a parameter is out of range
  kNotFound = 2,            // no such sequence/block (also for another tenant's sequence)
  kAlreadyExists = 3,       // create of an existing sequence
  kFailedPrecondition = 4,  // state does not allow the operation (e.g. append past a gap)
  kOutOfRange = 5,          // position or index beyond what exists
  kBusy = 6,                // a bounded queue is full; retry later
  kTryAgain = 7,            // transient condition; retry now
  kTimedOut = 8,            // a deadline passed
  kCancelled = 9,           // the operation was cancelled (shutdown, disconnect)
  kNoSpace = 10,            // a tier or the disk is full
  kUnauthenticated = 11,    // missing or wrong auth token
  kPermissionDenied = 12,   // authenticated, but not allowed
  kUnavailable = 13,        // the service or device is not available (e.g. no CUDA device)
  kCorruption = 14,         // stored data failed its checksum or does not parse
  kUnimplemented = 15,      // not supported by this build or backend
  kInternal = 16,           // a bug: an invariant was broken
};
inline constexpr uint32_t kMaxStatusCode = 16;

// Name of a code, e.g. "InvalidArgument". Unknown values give "Unknown".
std::string_view StatusCodeName(StatusCode code);
// Code for a wire value; values above kMaxStatusCode map to kInternal.
StatusCode StatusCodeFromWire(uint32_t value);

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;  // OK
  Status(StatusCode code, std::string_view msg);
  Status(const Status& other) : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status Ok() { return Status(); }
#define KVM_STATUS_FACTORY(Name)                                                        \
  static Status Name(std::string_view msg) { return Status(StatusCode::k##Name, msg); } \
  bool Is##Name() const { return code() == StatusCode::k##Name; }
  KVM_STATUS_FACTORY(InvalidArgument)
  KVM_STATUS_FACTORY(NotFound)
  KVM_STATUS_FACTORY(AlreadyExists)
  KVM_STATUS_FACTORY(FailedPrecondition)
  KVM_STATUS_FACTORY(OutOfRange)
  KVM_STATUS_FACTORY(Busy)
  KVM_STATUS_FACTORY(TryAgain)
  KVM_STATUS_FACTORY(TimedOut)
  KVM_STATUS_FACTORY(Cancelled)
  KVM_STATUS_FACTORY(NoSpace)
  KVM_STATUS_FACTORY(Unauthenticated)
  KVM_STATUS_FACTORY(PermissionDenied)
  KVM_STATUS_FACTORY(Unavailable)
  KVM_STATUS_FACTORY(Corruption)
  KVM_STATUS_FACTORY(Unimplemented)
  KVM_STATUS_FACTORY(Internal)
#undef KVM_STATUS_FACTORY

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // The message without the code name; empty when OK.
  const std::string& message() const;
  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;
  // Returns a copy whose message is "<prefix>: <message>" (OK stays OK).
  Status WithContext(std::string_view prefix) const;
  // Deliberately ignores this status (visible in the code).
  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string msg;
  };
  std::unique_ptr<Rep> rep_;
};

// A value or a non-OK Status. Constructing a Result from an OK Status is a bug and yields
// Internal. value() on an error Result aborts (check ok() first).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status)                          // NOLINT(google-explicit-constructor)
      : status_(status.ok() ? Status::Internal("Result constructed from an OK Status")
                            : std::move(status)) {}

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & {
    Check();
    return *value_;
  }
  const T& value() const& {
    Check();
    return *value_;
  }
  T&& value() && {
    Check();
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T value_or(T other) const& { return ok() ? *value_ : std::move(other); }

 private:
  void Check() const {
    if (!value_) AbortOnError(status_);
  }
  [[noreturn]] static void AbortOnError(const Status& s);
  std::optional<T> value_;
  Status status_;  // OK when value_ is set
};

[[noreturn]] void AbortWithStatus(const Status& s);
template <typename T>
void Result<T>::AbortOnError(const Status& s) {
  AbortWithStatus(s);
}

}  // namespace kvm

#define KVM_CONCAT_INNER_(a, b) a##b
#define KVM_CONCAT_(a, b) KVM_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define KVM_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::kvm::Status kvm_status_ = (expr);        \
    if (!kvm_status_.ok()) return kvm_status_; \
  } while (0)

// `lhs = value of expr` or returns its Status. lhs may be a declaration: KVM_ASSIGN_OR_RETURN(auto
// x, F());
#define KVM_ASSIGN_OR_RETURN(lhs, expr) \
  KVM_ASSIGN_OR_RETURN_IMPL_(KVM_CONCAT_(kvm_result_, __LINE__), lhs, expr)
#define KVM_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()
