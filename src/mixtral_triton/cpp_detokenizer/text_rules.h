// The detokenizer's text rules (the C++ side of mixtral_triton.text): token bytes in, whole
// UTF-8 characters out, cut before the first stop string. No Triton here: detokenizer.cc
// uses it per stream, and tests/cpp/text_rules_driver.cc feeds it the fuzz tests' cases.
#pragma once
#include <algorithm>
#include <string>
#include <vector>

namespace mixtral_detokenizer {

// ---- UTF-8: emit the longest whole prefix, hold back an incomplete tail, replace
// invalid bytes with U+FFFD by maximal subparts (as Python's "replace" decoder does).
inline constexpr char kReplacement[] = "\xEF\xBF\xBD";

// Appends the decodable part of `pending` to `out` and leaves an incomplete tail in
// `pending` (or, when final, replaces it by one U+FFFD).
inline void DecodeUtf8(std::string& pending, std::string& out, bool final) {
  const unsigned char* s = reinterpret_cast<const unsigned char*>(pending.data());
  const size_t n = pending.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) { out.push_back(static_cast<char>(c)); ++i; continue; }
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else { out += kReplacement; ++i; continue; }
    size_t j = 1;
    bool bad = false;
    for (; j <= need; ++j) {
      if (i + j >= n) break;  // incomplete so far
      unsigned char b = s[i + j];
      unsigned char l = (j == 1) ? lo : 0x80, h = (j == 1) ? hi : 0xBF;
      if (b < l || b > h) { bad = true; break; }
    }
    if (bad) { out += kReplacement; i += j; continue; }
    if (j <= need) {  // ran out of bytes: an incomplete character
      if (final) { out += kReplacement; i = n; break; }
      pending.erase(0, i);
      return;
    }
    out.append(reinterpret_cast<const char*>(s + i), need + 1);
    i += need + 1;
  }
  pending.clear();
}

// Whether `text` is whole, valid UTF-8 (by the rules above: nothing would be replaced).
inline bool IsValidUtf8(const std::string& text) {
  std::string pending = text, decoded;
  DecodeUtf8(pending, decoded, true);
  return decoded == text;
}

// ---- stop strings over streamed text (the rules of mixtral_triton.text.stops): the text
// ends before the stop that completes first (the smallest end; of two ending together, the
// longer); a tail that may begin a stop is held until the next text settles it. Bytes and
// characters give the same cuts here: the text and the stops are whole UTF-8 characters,
// and a UTF-8 string can only match another at character boundaries.
struct StopMatcher {
  std::vector<std::string> stops;
  size_t max_held = 0;  // longest stop - 1
  std::string held;     // a tail that may begin a stop
  bool stopped = false;
  std::string matched;  // the stop that ended the text, once stopped

  void Add(std::string stop) {
    if (stop.empty()) return;  // padding
    max_held = std::max(max_held, stop.size() - 1);
    stops.push_back(std::move(stop));
  }

  // The part of held + text now known to come before any stop.
  std::string Push(const std::string& chunk) {
    if (stopped) return "";
    if (stops.empty()) return chunk;
    std::string text = held + chunk;
    const std::string* best = nullptr;
    size_t best_start = 0, best_end = 0;
    for (const std::string& stop : stops) {
      const size_t start = text.find(stop);
      if (start == std::string::npos) continue;
      const size_t end = start + stop.size();
      if (best == nullptr || end < best_end || (end == best_end && start < best_start)) {
        best = &stop;
        best_start = start;
        best_end = end;
      }
    }
    if (best != nullptr) {
      stopped = true;
      matched = *best;
      held.clear();
      return text.substr(0, best_start);
    }
    const size_t keep = PartialStopLength(text);
    held = text.substr(text.size() - keep);
    text.resize(text.size() - keep);
    return text;
  }

  // No more text: what was held cannot become a stop any more.
  std::string Finish() {
    std::string text;
    text.swap(held);
    return text;
  }

 private:
  // The longest tail of `text` that is a proper prefix of some stop.
  size_t PartialStopLength(const std::string& text) const {
    for (size_t k = std::min(text.size(), max_held); k > 0; --k) {
      for (const std::string& stop : stops) {
        if (stop.size() > k && text.compare(text.size() - k, k, stop, 0, k) == 0) return k;
      }
    }
    return 0;
  }
};

// One completion's text (the rules of mixtral_triton.text.TextStream): token bytes in,
// whole characters out, cut before the first stop string (then nothing more comes out).
struct CompletionText {
  std::string pending;  // bytes of an incomplete character
  StopMatcher stops;
  bool include_stop = false;  // the matched stop string ends the text

  bool stopped() const { return stops.stopped; }

  std::string Push(const std::string& bytes) {
    if (stopped()) return "";
    pending += bytes;
    std::string text;
    DecodeUtf8(pending, text, false);
    return WithStop(stops.Push(text));
  }

  // The end of the completion: a character left incomplete becomes U+FFFD, and text held
  // because it might begin a stop is let go.
  std::string Finish() {
    if (stopped()) return "";
    std::string tail;
    DecodeUtf8(pending, tail, true);
    std::string text = WithStop(stops.Push(tail));
    return stopped() ? text : text + stops.Finish();
  }

 private:
  std::string WithStop(std::string text) const {
    if (stopped() && include_stop) text += stops.matched;
    return text;
  }
};

}  // namespace mixtral_detokenizer
