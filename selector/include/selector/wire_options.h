// A sequence's selector on the wire: SelectorOptions + the selector's name ↔ wire SelectorParams
// (CreateSequence). One converter for the client (which sends it) and the service (which runs it).
// Library kvm_selector_wire (kvm_selector itself stays free of protobuf). Pure; thread-safe.
#pragma once

#include <string>

#include "proto/status.h"
#include "selector/options.h"

namespace kvm::wire {
class SelectorParams;
}

namespace kvm::sel {

struct NamedOptions {
  std::string name;  // a served selector of the registry (registry.h)
  SelectorOptions options;
};

void ToWire(const NamedOptions& o, wire::SelectorParams* out);
// InvalidArgument for an unknown name or one the registry keeps in-process (hshare, h2o); the
// options are not validated here (the selector's Make does that, naming the field).
Result<NamedOptions> FromWire(const wire::SelectorParams& p, uint32_t block_size);

}  // namespace kvm::sel
