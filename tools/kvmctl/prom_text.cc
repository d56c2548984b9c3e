#include "prom_text.h"

#include <cmath>
#include <cstdlib>

namespace kvm::tools::prom {
namespace {

bool NameStart(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}
bool NameChar(char c) { return NameStart(c) || (c >= '0' && c <= '9'); }

// A float as the format writes it: Go's ParseFloat syntax, NaN, +Inf, -Inf. The whole token must
// be consumed.
bool ParseValue(const std::string& tok, double* out) {
  if (tok == "NaN") return *out = NAN, true;
  if (tok == "+Inf" || tok == "Inf") return *out = INFINITY, true;
  if (tok == "-Inf") return *out = -INFINITY, true;
  if (tok.empty()) return false;
  for (char c : tok)  // strtod alone would take "inf", "nan(...)", hex and leading spaces
    if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-'))
      return false;
  char* end = nullptr;
  *out = std::strtod(tok.c_str(), &end);
  return end == tok.c_str() + tok.size();
}

struct LineParser {
  const std::string& s;
  size_t i = 0;
  std::string err;

  void SkipSpaces() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
  }
  bool Name(std::string* out) {
    if (i >= s.size() || !NameStart(s[i])) return false;
    const size_t b = i;
    while (i < s.size() && NameChar(s[i])) ++i;
    *out = s.substr(b, i - b);
    return true;
  }
  bool Fail(const std::string& what) {
    err = what + " at column " + std::to_string(i + 1);
    return false;
  }
  bool Labels(std::map<std::string, std::string>* out) {
    ++i;  // '{'
    for (;;) {
      SkipSpaces();
      if (i < s.size() && s[i] == '}') return ++i, true;
      std::string key;
      if (!Name(&key)) return Fail("expected a label name");
      SkipSpaces();
      if (i >= s.size() || s[i] != '=') return Fail("expected '=' after label " + key);
      ++i;
      SkipSpaces();
      if (i >= s.size() || s[i] != '"') return Fail("expected '\"' to open label " + key);
      ++i;
      std::string v;
      for (;;) {
        if (i >= s.size()) return Fail("unterminated value of label " + key);
        const char c = s[i++];
        if (c == '"') break;
        if (c != '\\') {
          v += c;
          continue;
        }
        if (i >= s.size()) return Fail("unterminated escape in label " + key);
        const char e = s[i++];
        if (e == 'n')
          v += '\n';
        else if (e == '\\' || e == '"')
          v += e;
        else
          return Fail(std::string("bad escape \\") + e + " in label " + key);
      }
      if (!out->emplace(key, v).second) return Fail("label " + key + " given twice");
      SkipSpaces();
      if (i < s.size() && s[i] == ',') {
        ++i;
        continue;
      }
      if (i < s.size() && s[i] == '}') return ++i, true;
      return Fail("expected ',' or '}' after label " + key);
    }
  }
  bool Token(std::string* out) {
    SkipSpaces();
    const size_t b = i;
    while (i < s.size() && s[i] != ' ' && s[i] != '\t') ++i;
    *out = s.substr(b, i - b);
    return !out->empty();
  }
  bool Line(Sample* out) {
    SkipSpaces();
    if (!Name(&out->name)) return Fail("expected a metric name");
    SkipSpaces();
    if (i < s.size() && s[i] == '{' && !Labels(&out->labels)) return false;
    std::string tok;
    if (!Token(&tok)) return Fail("expected a value");
    if (!ParseValue(tok, &out->value)) return Fail("bad value '" + tok + "'");
    if (Token(&tok)) {  // optional timestamp (integer milliseconds)
      char* end = nullptr;
      std::strtoll(tok.c_str(), &end, 10);
      if (*end) return Fail("bad timestamp '" + tok + "'");
    }
    SkipSpaces();
    if (i != s.size()) return Fail("unexpected text after the sample");
    return true;
  }
};

bool Matches(const Sample& s, const std::map<std::string, std::string>& match) {
  for (const auto& [k, v] : match) {
    auto it = s.labels.find(k);
    if (it == s.labels.end() || it->second != v) return false;
  }
  return true;
}

}  // namespace

bool Parse(const std::string& text, std::vector<Sample>* out, std::string* error) {
  out->clear();
  size_t pos = 0;
  for (int line_no = 1; pos <= text.size(); ++line_no) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    size_t first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] == '#') continue;
    LineParser p{line};
    Sample smp;
    if (!p.Line(&smp)) {
      *error = "line " + std::to_string(line_no) + ": " + p.err;
      return false;
    }
    out->push_back(std::move(smp));
  }
  return true;
}

std::vector<const Sample*> Select(const std::vector<Sample>& samples, const std::string& name,
                                  const std::map<std::string, std::string>& match) {
  std::vector<const Sample*> r;
  for (const auto& s : samples)
    if (s.name == name && Matches(s, match)) r.push_back(&s);
  return r;
}

double Sum(const std::vector<Sample>& samples, const std::string& name,
           const std::map<std::string, std::string>& match) {
  const auto sel = Select(samples, name, match);
  if (sel.empty()) return NAN;
  double t = 0;
  for (const Sample* s : sel) t += s->value;
  return t;
}

std::map<double, double> Buckets(const std::vector<Sample>& samples, const std::string& name,
                                 const std::map<std::string, std::string>& match) {
  std::map<double, double> b;
  for (const Sample* s : Select(samples, name + "_bucket", match)) {
    auto it = s->labels.find("le");
    double le = 0;
    if (it == s->labels.end() || !ParseValue(it->second, &le)) continue;
    b[le] += s->value;
  }
  return b;
}

double HistogramQuantile(double q, const std::map<double, double>& b) {
  if (b.empty() || !std::isinf(b.rbegin()->first) || b.size() < 2) return NAN;
  const double total = b.rbegin()->second;
  if (!(total > 0) || !(q >= 0 && q <= 1)) return NAN;
  const double rank = q * total;
  double prev_le = 0, prev_count = 0;
  bool first = true;
  for (const auto& [le, count] : b) {
    if (count >= rank) {
      if (std::isinf(le)) return prev_le;  // in the +Inf bucket: the highest finite bound
      const double lo = first ? (le > 0 ? 0.0 : le) : prev_le;
      if (count == prev_count) return le;
      return lo + (le - lo) * (rank - prev_count) / (count - prev_count);
    }
    prev_le = le;
    prev_count = count;
    first = false;
  }
  return NAN;  // not reached: the +Inf bucket holds the total
}

double Rate(double before, double after, double seconds) {
  if (!std::isfinite(before) || !std::isfinite(after) || !(seconds > 0) || after < before)
    return NAN;
  return (after - before) / seconds;
}

}  // namespace kvm::tools::prom
