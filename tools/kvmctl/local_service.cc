#include "local_service.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <thread>

namespace kvm::tools {

Status LocalService::Start(const std::string& binary, const std::vector<std::string>& extra) {
  char tmpl[] = "/tmp/kvmctl_service_XXXXXX";
  if (!mkdtemp(tmpl)) return Status::Internal("cannot create a temporary directory");
  dir_ = tmpl;
  int fds[2];
  if (pipe(fds) != 0) return Status::Internal("pipe failed");
  const std::string data = dir_ + "/data";
  std::vector<std::string> args = {binary,        "--listen",   "127.0.0.1:0", "--admin",
                                   "127.0.0.1:0", "--data-dir", data};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_ = fork();
  if (pid_ < 0) return Status::Internal("fork failed");
  if (pid_ == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    execv(binary.c_str(), argv.data());
    std::perror("kvmctl: exec kvmanager");
    _exit(127);
  }
  close(fds[1]);
  FILE* out = fdopen(fds[0], "r");
  char line[512];
  while (out && std::fgets(line, sizeof(line), out)) {
    const std::string l(line);
    const std::string key = "kvmanager listening on ";
    if (l.rfind(key, 0) == 0) {
      address_ = l.substr(key.size(), l.find(' ', key.size()) - key.size());
      break;
    }
  }
  // Keep reading (and dropping) its stdout so it never blocks on a full pipe.
  if (out)
    std::thread([out] {
      char buf[512];
      while (std::fgets(buf, sizeof(buf), out)) {
      }
      std::fclose(out);
    }).detach();
  if (address_.empty()) {
    Stop();
    return Status::Unavailable("kvmanager (" + binary + ") did not start");
  }
  return Status::Ok();
}

void LocalService::Stop() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    int st = 0;
    waitpid(pid_, &st, 0);
    pid_ = -1;
  }
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
    dir_.clear();
  }
}

std::string FindKvmanager(const Flags& f) {
  if (auto v = f.Str("kvmanager")) return *v;
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  for (const auto& rel : {"../../kvmanager/kvmanager", "kvmanager", "../kvmanager/kvmanager"}) {
    const auto p = exe.parent_path() / rel;
    if (!ec && std::filesystem::exists(p)) return std::filesystem::weakly_canonical(p).string();
  }
  throw UsageError("--kvmanager is required (no kvmanager binary found next to this kvmctl)");
}

}  // namespace kvm::tools
