#include "proto/status.h"

#include <cstdio>
#include <cstdlib>

namespace kvm {
namespace {
constexpr std::string_view kNames[] = {"OK",
                                       "InvalidArgument",
                                       "NotFound",
                                       "AlreadyExists",
                                       "FailedPrecondition",
                                       "OutOfRange",
                                       "Busy",
                                       "TryAgain",
                                       "TimedOut",
                                       "Cancelled",
                                       "NoSpace",
                                       "Unauthenticated",
                                       "PermissionDenied",
                                       "Unavailable",
                                       "Corruption",
                                       "Unimplemented",
                                       "Internal"};
static_assert(std::size(kNames) == kMaxStatusCode + 1);
const std::string kEmpty;
}  // namespace

std::string_view StatusCodeName(StatusCode code) {
  auto v = static_cast<uint32_t>(code);
  return v <= kMaxStatusCode ? kNames[v] : std::string_view("Unknown");
}

StatusCode StatusCodeFromWire(uint32_t value) {
  return value <= kMaxStatusCode ? static_cast<StatusCode>(value) : StatusCode::kInternal;
}

Status::Status(StatusCode code, std::string_view msg) {
  if (code != StatusCode::kOk) rep_ = std::make_unique<Rep>(Rep{code, std::string(msg)});
}

const std::string& Status::message() const { return rep_ ? rep_->msg : kEmpty; }

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(StatusCodeName(rep_->code));
  if (!rep_->msg.empty()) s += ": " + rep_->msg;
  return s;
}

Status Status::WithContext(std::string_view prefix) const {
  if (ok()) return *this;
  return Status(rep_->code, std::string(prefix) + ": " + rep_->msg);
}

void AbortWithStatus(const Status& s) {
  std::fprintf(stderr, "kvm: value() of an error Result: %s\n", s.ToString().c_str());
  std::abort();
}

}  // namespace kvm
