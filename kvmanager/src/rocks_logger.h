// Internal to the block store: RocksDB's info log (LOG in the store's directory) written with
// stdio, whose failed writes are dropped. RocksDB's own file logger asserts on its next write once
// a write failed (`sync_without_flush_called_` in WritableFileWriter; Debian's librocksdb keeps its
// assertions): on a full disk the first background error RocksDB logs aborted the whole process
// instead of the append answering NoSpace.
#pragma once

#include <rocksdb/env.h>
#include <sys/time.h>

#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>
#include <string>

namespace kvm::store {

class StdioRocksLogger : public rocksdb::Logger {
 public:
  // A new log at `path` (the previous one kept as `path`.old), or nullptr when it cannot be opened.
  static std::shared_ptr<rocksdb::Logger> Open(const std::string& path) {
    std::rename(path.c_str(), (path + ".old").c_str());
    FILE* f = std::fopen(path.c_str(), "we");
    if (!f) return nullptr;
    return std::shared_ptr<rocksdb::Logger>(new StdioRocksLogger(f));
  }
  ~StdioRocksLogger() override { std::fclose(f_); }

  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override {
    timeval now{};
    gettimeofday(&now, nullptr);
    tm t{};
    localtime_r(&now.tv_sec, &t);
    std::lock_guard<std::mutex> l(mu_);
    std::fprintf(f_, "%04d/%02d/%02d-%02d:%02d:%02d.%06ld ", t.tm_year + 1900, t.tm_mon + 1,
                 t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, static_cast<long>(now.tv_usec));
    std::vfprintf(f_, format, ap);
    std::fputc('\n', f_);
    std::fflush(f_);  // a failure (ENOSPC) is dropped: the log is best effort
    std::clearerr(f_);
  }
  void Flush() override {
    std::lock_guard<std::mutex> l(mu_);
    std::fflush(f_);
  }

 private:
  explicit StdioRocksLogger(FILE* f) : rocksdb::Logger(rocksdb::InfoLogLevel::INFO_LEVEL), f_(f) {}
  std::mutex mu_;
  FILE* f_;
};

}  // namespace kvm::store
