// Test driver for the C++ detokenizer's text rules (tests/test_fuzz.py): the backend's own
// CompletionText (text_rules.h) fed the cases Python sends.
//
// stdin, per case (little-endian): u8 include_stop, u32 stop count, each stop (u32 length,
// bytes), u32 chunk count, each chunk of token bytes as one engine response delivers it
// (u32 length, bytes). stdout, per case: u32 piece count, each piece (u32 length, bytes) -
// one per chunk and one for the end - then u8 stopped.
#include <cstdint>
#include <cstdio>

#include "text_rules.h"

using mixtral_detokenizer::CompletionText;

namespace {

bool ReadU32(uint32_t& v) { return std::fread(&v, 4, 1, stdin) == 1; }

bool ReadBytes(std::string& out) {
  uint32_t n;
  if (!ReadU32(n)) return false;
  out.resize(n);
  return n == 0 || std::fread(&out[0], 1, n, stdin) == n;
}

void WriteBytes(const std::string& v) {
  const uint32_t n = static_cast<uint32_t>(v.size());
  std::fwrite(&n, 4, 1, stdout);
  std::fwrite(v.data(), 1, v.size(), stdout);
}

}  // namespace

int main() {
  unsigned char include_stop;
  while (std::fread(&include_stop, 1, 1, stdin) == 1) {
    CompletionText text;
    text.include_stop = include_stop != 0;
    uint32_t count;
    if (!ReadU32(count)) return 1;
    for (uint32_t i = 0; i < count; ++i) {
      std::string stop;
      if (!ReadBytes(stop)) return 1;
      text.stops.Add(stop);
    }
    if (!ReadU32(count)) return 1;
    std::vector<std::string> pieces;
    for (uint32_t i = 0; i < count; ++i) {
      std::string chunk;
      if (!ReadBytes(chunk)) return 1;
      pieces.push_back(text.Push(chunk));
    }
    pieces.push_back(text.Finish());
    const uint32_t n = static_cast<uint32_t>(pieces.size());
    std::fwrite(&n, 4, 1, stdout);
    for (const std::string& piece : pieces) WriteBytes(piece);
    const unsigned char stopped = text.stopped() ? 1 : 0;
    std::fwrite(&stopped, 1, 1, stdout);
    std::fflush(stdout);
  }
  return 0;
}
