// The streaming detokenizer as a Triton backend in C++ (a prototype; see __init__.py): a
// decoupled model in the `postprocessing` role that calls the `tensorrt_llm` model
// in-process through the server object (TRITONSERVER_ServerInferAsync), turns each engine
// response's new token ids into whole UTF-8 text through the same token table as the
// Python detokenizer, and streams text_output / finish_reason / prompt_tokens /
// completion_tokens. No Python stub, so no IPC round trip per response, and no HTTP hop.
//
// Not yet here (the Python detokenizer has them; requests that need them are refused,
// naming the field): stop strings, echo, skip_special_tokens false, return_num_*_tokens,
// and runs in the cancellation registry (a `stop` is only answered).
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

#include "triton_api.h"

namespace {

#define RETURN_IF_ERR(X)                 \
  do {                                   \
    TRITONSERVER_Error* e__ = (X);       \
    if (e__ != nullptr) return e__;      \
  } while (false)

void Log(TRITONSERVER_LogLevel level, int line, const std::string& msg) {
  TRITONSERVER_Error* e = TRITONSERVER_LogMessage(level, "detokenizer.cc", line, msg.c_str());
  if (e) TRITONSERVER_ErrorDelete(e);
}

std::string Lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

struct Stream;
using Clock = std::chrono::steady_clock;

struct ModelState {
  // Coalescing (as the Python detokenizer's MIN_RESPONSE_INTERVAL_S): at most one
  // response per stream per interval; text that comes sooner waits for the flusher
  // thread (or the next engine response / the end). 0: one response per engine response.
  Clock::duration min_interval{0};
  std::mutex qmu;
  std::condition_variable qcv;
  // In the order the streams were armed; a deadline is the stream's last send + the interval,
  // so one may wait behind an earlier-armed one by at most an interval.
  std::deque<std::pair<Clock::time_point, Stream*>> queue;
  bool stopping = false;
  std::thread flusher;
  TRITONSERVER_Server* server = nullptr;
  TRITONSERVER_ResponseAllocator* allocator = nullptr;
  std::vector<std::string> table;  // token id -> bytes (skip_special_tokens=true)
  std::string engine = "tensorrt_llm";
};

// ---- UTF-8: emit the longest whole prefix, hold back an incomplete tail, replace
// invalid bytes with U+FFFD by maximal subparts (as Python's "replace" decoder does).
const char kReplacement[] = "\xEF\xBF\xBD";

// Appends the decodable part of `pending` to `out` and leaves an incomplete tail in
// `pending` (or, when final, replaces it by one U+FFFD).
void DecodeUtf8(std::string& pending, std::string& out, bool final) {
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

// One client request: lives until the engine's final response has been answered and the
// engine request (which points at our input copies) has been released.
struct Stream {
  ModelState* model = nullptr;
  TRITONBACKEND_ResponseFactory* factory = nullptr;
  struct EngineInput {
    std::string name;  // the engine's (lower-case) input name
    TRITONSERVER_DataType datatype;
    std::vector<int64_t> shape;
    std::string data;
  };
  std::vector<EngineInput> engine_inputs;  // copied: they must outlive the engine request
  int32_t input_length = 0, max_tokens = 0;
  bool streaming = true;  // false: one response, at the end
  bool yes = true;
  std::mutex mu;
  std::string pending;  // bytes of an incomplete character
  std::string held;     // whole text not sent yet (coalescing)
  Clock::time_point last_send{};
  bool armed = false;   // queued on the flusher
  int32_t completion_tokens = 0;
  bool done = false;
  std::atomic<int> refs{2};  // final response + engine request release

  void Unref() {
    if (refs.fetch_sub(1) == 1) {
      if (factory) TRITONBACKEND_ResponseFactoryDelete(factory);
      delete this;
    }
  }
};

// Adds a [1, 1] output holding `content` (already in the tensor's wire form).
TRITONSERVER_Error* AddOutput(TRITONBACKEND_Response* r, const char* name, TRITONSERVER_DataType type,
                              const std::string& content) {
  TRITONBACKEND_Output* out;
  const int64_t shape[2] = {1, 1};
  RETURN_IF_ERR(TRITONBACKEND_ResponseOutput(r, &out, name, type, shape, 2));
  void* buf;
  TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
  int64_t mid = 0;
  RETURN_IF_ERR(TRITONBACKEND_OutputBuffer(out, &buf, content.size(), &mt, &mid));
  std::memcpy(buf, content.data(), content.size());
  return nullptr;
}

// One BYTES element: a little-endian uint32 length, then the bytes.
TRITONSERVER_Error* AddOutputBytes(TRITONBACKEND_Response* r, const char* name, const std::string& v) {
  const uint32_t len = static_cast<uint32_t>(v.size());
  return AddOutput(r, name, TRITONSERVER_TYPE_BYTES, std::string(reinterpret_cast<const char*>(&len), 4) + v);
}

TRITONSERVER_Error* AddOutputInt(TRITONBACKEND_Response* r, const char* name, int32_t v) {
  return AddOutput(r, name, TRITONSERVER_TYPE_INT32, std::string(reinterpret_cast<const char*>(&v), 4));
}

// Sends a text response (final: with the finish reason and the FINAL flag).
void SendText(Stream* s, const std::string& text, const std::string& reason, bool final) {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, s->factory);
  if (e == nullptr) e = AddOutputBytes(r, "text_output", text);
  if (e == nullptr) e = AddOutputBytes(r, "finish_reason", reason);
  if (e == nullptr) e = AddOutputInt(r, "prompt_tokens", s->input_length);
  if (e == nullptr) e = AddOutputInt(r, "completion_tokens", s->completion_tokens);
  if (e != nullptr) {
    Log(TRITONSERVER_LOG_ERROR, __LINE__, std::string("detokenizer: building a response: ") + TRITONSERVER_ErrorMessage(e));
    if (r) {
      TRITONSERVER_Error* send = TRITONBACKEND_ResponseSend(
          r, final ? uint32_t(TRITONSERVER_RESPONSE_COMPLETE_FINAL) : 0u, e);  // the error goes to the client
      if (send) TRITONSERVER_ErrorDelete(send);
    } else if (final) {
      TRITONBACKEND_ResponseFactorySendFlags(s->factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL);
    }
    TRITONSERVER_ErrorDelete(e);
    return;
  }
  e = TRITONBACKEND_ResponseSend(r, final ? uint32_t(TRITONSERVER_RESPONSE_COMPLETE_FINAL) : 0u, nullptr);
  if (e) {
    Log(TRITONSERVER_LOG_ERROR, __LINE__, std::string("detokenizer: send: ") + TRITONSERVER_ErrorMessage(e));
    TRITONSERVER_ErrorDelete(e);
  }
}

void SendError(TRITONBACKEND_ResponseFactory* factory, const std::string& msg,
               TRITONSERVER_Error_Code code = TRITONSERVER_ERROR_INTERNAL) {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, factory);
  if (e) {
    TRITONSERVER_ErrorDelete(e);
    TRITONBACKEND_ResponseFactorySendFlags(factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL);
    return;
  }
  TRITONSERVER_Error* err = TRITONSERVER_ErrorNew(code, msg.c_str());
  e = TRITONBACKEND_ResponseSend(r, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err);
  TRITONSERVER_ErrorDelete(err);  // ResponseSend does not take ownership of the error
  if (e) TRITONSERVER_ErrorDelete(e);
}

// ---- response allocator: plain CPU malloc ----
TRITONSERVER_Error* Alloc(TRITONSERVER_ResponseAllocator*, const char*, size_t byte_size,
                          TRITONSERVER_MemoryType, int64_t, void*, void** buffer, void** buffer_userp,
                          TRITONSERVER_MemoryType* actual_type, int64_t* actual_id) {
  *actual_type = TRITONSERVER_MEMORY_CPU;
  *actual_id = 0;
  *buffer_userp = nullptr;
  *buffer = byte_size == 0 ? nullptr : std::malloc(byte_size);
  if (byte_size != 0 && *buffer == nullptr)
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, "detokenizer: out of memory");
  return nullptr;
}

TRITONSERVER_Error* Release(TRITONSERVER_ResponseAllocator*, void* buffer, void*, size_t,
                            TRITONSERVER_MemoryType, int64_t) {
  std::free(buffer);
  return nullptr;
}

void EngineRequestReleased(TRITONSERVER_InferenceRequest* request, const uint32_t flags, void* userp) {
  if (flags & TRITONSERVER_REQUEST_RELEASE_ALL) {
    TRITONSERVER_InferenceRequestDelete(request);
    static_cast<Stream*>(userp)->Unref();
  }
}

// One engine response (or a flags-only final): new tokens -> text -> one response.
void EngineResponse(TRITONSERVER_InferenceResponse* response, const uint32_t flags, void* userp) {
  Stream* s = static_cast<Stream*>(userp);
  const bool final = (flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL) != 0;
  std::string failure;
  TRITONSERVER_Error_Code failure_code = TRITONSERVER_ERROR_INTERNAL;
  std::string text;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (response != nullptr && !s->done) {
      TRITONSERVER_Error* err = TRITONSERVER_InferenceResponseError(response);
      if (err != nullptr) {
        failure = TRITONSERVER_ErrorMessage(err);  // owned by the response
        failure_code = TRITONSERVER_ErrorCode(err);  // an overload stays UNAVAILABLE
      } else {
        uint32_t count = 0;
        TRITONSERVER_InferenceResponseOutputCount(response, &count);
        const int32_t* ids = nullptr;
        size_t n_ids = 0;
        int64_t seq_len = -1;
        for (uint32_t i = 0; i < count; ++i) {
          const char* name;
          TRITONSERVER_DataType dt;
          const int64_t* shape;
          uint64_t dims;
          const void* base;
          size_t bytes;
          TRITONSERVER_MemoryType mt;
          int64_t mid;
          void* up;
          if (TRITONSERVER_InferenceResponseOutput(response, i, &name, &dt, &shape, &dims, &base, &bytes,
                                                   &mt, &mid, &up) != nullptr) continue;
          if (std::strcmp(name, "output_ids") == 0) {
            ids = static_cast<const int32_t*>(base);
            n_ids = bytes / 4;
          } else if (std::strcmp(name, "sequence_length") == 0 && bytes >= 4) {
            seq_len = *static_cast<const int32_t*>(base);
          }
        }
        if (seq_len >= 0 && static_cast<size_t>(seq_len) < n_ids) n_ids = seq_len;
        const size_t vocab = s->model->table.size();
        for (size_t k = 0; k < n_ids; ++k) {
          if (ids[k] < 0 || static_cast<size_t>(ids[k]) >= vocab) {
            failure = "token id " + std::to_string(ids[k]) + " is outside the vocabulary 0.." +
                      std::to_string(vocab - 1);
            break;
          }
          s->pending += s->model->table[ids[k]];
        }
        if (failure.empty()) {
          s->completion_tokens += static_cast<int32_t>(n_ids);
          DecodeUtf8(s->pending, text, false);
        }
      }
      TRITONSERVER_InferenceResponseDelete(response);
      response = nullptr;
    }
    if (response != nullptr) TRITONSERVER_InferenceResponseDelete(response);
    if (!s->done) {
      if (!failure.empty()) {
        s->done = true;
        SendError(s->factory, failure, failure_code);
      } else if (final) {
        DecodeUtf8(s->pending, text, true);
        text = s->held + text;
        s->held.clear();
        s->done = true;
        SendText(s, text, s->completion_tokens >= s->max_tokens ? "length" : "stop", true);
      } else if (!text.empty()) {
        if (!s->streaming) {
          s->held += text;
        } else if (s->model->min_interval.count() == 0) {
          SendText(s, text, "", false);
        } else {
          s->held += text;
          const auto now = Clock::now();
          if (!s->armed) {
            if (now - s->last_send >= s->model->min_interval) {
              SendText(s, s->held, "", false);
              s->held.clear();
              s->last_send = now;
            } else {
              s->armed = true;
              s->refs.fetch_add(1);
              ModelState* m = s->model;
              std::lock_guard<std::mutex> q(m->qmu);
              m->queue.emplace_back(s->last_send + m->min_interval, s);
              m->qcv.notify_one();
            }
          }
        }
      }
    }
  }
  if (final) s->Unref();
}

void FlushLoop(ModelState* m) {
  std::unique_lock<std::mutex> q(m->qmu);
  while (true) {
    if (m->stopping) break;
    if (m->queue.empty()) { m->qcv.wait(q); continue; }
    auto [deadline, s] = m->queue.front();
    if (Clock::now() < deadline) { m->qcv.wait_until(q, deadline); continue; }
    m->queue.pop_front();
    q.unlock();
    {
      std::lock_guard<std::mutex> lock(s->mu);
      s->armed = false;
      if (!s->done && !s->held.empty()) {
        SendText(s, s->held, "", false);
        s->held.clear();
        s->last_send = Clock::now();
      }
    }
    s->Unref();
    q.lock();
  }
}

// Copies one input tensor's bytes (all of its buffers, CPU only).
TRITONSERVER_Error* ReadInput(TRITONBACKEND_Input* in, uint64_t bytes, uint32_t buffers, std::string& out) {
  out.clear();
  out.reserve(bytes);
  for (uint32_t b = 0; b < buffers; ++b) {
    const void* buf;
    uint64_t size;
    TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
    int64_t mid = 0;
    RETURN_IF_ERR(TRITONBACKEND_InputBuffer(in, b, &buf, &size, &mt, &mid));
    if (mt == TRITONSERVER_MEMORY_GPU)
      return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_UNSUPPORTED, "detokenizer: an input in GPU memory");
    out.append(static_cast<const char*>(buf), size);
  }
  return nullptr;
}

int32_t FirstInt32(const std::string& data) {
  int32_t v = 0;
  if (data.size() >= 4) std::memcpy(&v, data.data(), 4);
  return v;
}

bool FirstFlag(const std::string& data) { return !data.empty() && data[0] != 0; }

// A stop or bad words list of the engine ([1, 2, N] int32: ids, then offsets) whose offsets
// are all padding (-1) holds no words: the engine gets nothing, as from the Python model.
bool OnlyPadding(const std::string& data, const int64_t* shape, uint32_t dims) {
  if (dims != 3 || shape[1] != 2) return false;
  const size_t n = static_cast<size_t>(shape[2]);
  if (data.size() < 8 * n) return false;
  for (size_t k = 0; k < n; ++k) {
    int32_t offset;
    std::memcpy(&offset, data.data() + 4 * (n + k), 4);
    if (offset >= 0) return false;
  }
  return true;
}

// Whether a BYTES tensor holds any non-empty string (4-byte length, then the bytes, each).
bool AnyText(const std::string& data) {
  size_t at = 0;
  while (at + 4 <= data.size()) {
    uint32_t len;
    std::memcpy(&len, data.data() + at, 4);
    if (len > 0) return true;
    at += 4 + len;
  }
  return false;
}

TRITONSERVER_Error* NotServedYet(const std::string& field) {
  const std::string lower = Lower(field);
  return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG,
                               ("[invalid_argument:" + lower + "] " + lower +
                                " is not served by the C++ detokenizer prototype yet").c_str());
}

// Reads one client request: the engine's inputs (upper-cased in the model config) are
// copied for the engine, the detokenizer's own are read or refused where not served yet.
TRITONSERVER_Error* ReadRequest(TRITONBACKEND_Request* request, Stream* s, bool* stop) {
  uint32_t count = 0;
  RETURN_IF_ERR(TRITONBACKEND_RequestInputCount(request, &count));
  for (uint32_t i = 0; i < count; ++i) {
    TRITONBACKEND_Input* in;
    RETURN_IF_ERR(TRITONBACKEND_RequestInputByIndex(request, i, &in));
    const char* name;
    TRITONSERVER_DataType datatype;
    const int64_t* shape;
    uint32_t dims;
    uint64_t bytes;
    uint32_t buffers;
    RETURN_IF_ERR(TRITONBACKEND_InputProperties(in, &name, &datatype, &shape, &dims, &bytes, &buffers));
    std::string data;
    RETURN_IF_ERR(ReadInput(in, bytes, buffers, data));
    const std::string field(name);
    if (field == "STOP") {
      *stop = FirstFlag(data);
    } else if (field == "STREAMING") {
      s->streaming = data.empty() || FirstFlag(data);
    } else if (field == "STOP_STRINGS" || field == "ECHO_TEXT") {
      if (AnyText(data)) return NotServedYet(field);
    } else if (field == "RETURN_NUM_INPUT_TOKENS" || field == "RETURN_NUM_OUTPUT_TOKENS" ||
               field == "INCLUDE_STOP_STR_IN_OUTPUT") {
      if (FirstFlag(data)) return NotServedYet(field);
    } else if (field == "SKIP_SPECIAL_TOKENS") {
      if (!data.empty() && !FirstFlag(data)) return NotServedYet(field);
    } else if ((field == "STOP_WORDS_LIST" || field == "BAD_WORDS_LIST") && OnlyPadding(data, shape, dims)) {
      continue;
    } else {
      if (field == "INPUT_LENGTHS") s->input_length = FirstInt32(data);
      if (field == "REQUEST_OUTPUT_LEN") s->max_tokens = FirstInt32(data);
      s->engine_inputs.push_back({Lower(field), datatype, std::vector<int64_t>(shape, shape + dims), std::move(data)});
    }
  }
  return nullptr;
}

TRITONSERVER_Error* StartEngine(ModelState* m, Stream* s) {
  TRITONSERVER_InferenceRequest* req = nullptr;
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestNew(&req, m->server, m->engine.c_str(), -1));
  auto fail = [&](TRITONSERVER_Error* e) { TRITONSERVER_InferenceRequestDelete(req); return e; };
  auto add = [&](const char* name, TRITONSERVER_DataType dt, const void* data, size_t bytes,
                 int64_t n) -> TRITONSERVER_Error* {
    const int64_t shape[2] = {1, n};
    RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddInput(req, name, dt, shape, 2));
    return TRITONSERVER_InferenceRequestAppendInputData(req, name, data, bytes, TRITONSERVER_MEMORY_CPU, 0);
  };
  TRITONSERVER_Error* e;
  for (const auto& input : s->engine_inputs) {
    if ((e = TRITONSERVER_InferenceRequestAddInput(req, input.name.c_str(), input.datatype, input.shape.data(),
                                                   input.shape.size())))
      return fail(e);
    if ((e = TRITONSERVER_InferenceRequestAppendInputData(req, input.name.c_str(), input.data.data(),
                                                          input.data.size(), TRITONSERVER_MEMORY_CPU, 0)))
      return fail(e);
  }
  // Always stream from the engine (as the Python detokenizer does), without the prompt.
  if ((e = add("streaming", TRITONSERVER_TYPE_BOOL, &s->yes, 1, 1))) return fail(e);
  if ((e = add("exclude_input_in_output", TRITONSERVER_TYPE_BOOL, &s->yes, 1, 1))) return fail(e);
  if ((e = TRITONSERVER_InferenceRequestAddRequestedOutput(req, "output_ids"))) return fail(e);
  if ((e = TRITONSERVER_InferenceRequestAddRequestedOutput(req, "sequence_length"))) return fail(e);
  if ((e = TRITONSERVER_InferenceRequestSetReleaseCallback(req, EngineRequestReleased, s))) return fail(e);
  if ((e = TRITONSERVER_InferenceRequestSetResponseCallback(req, m->allocator, nullptr, EngineResponse, s)))
    return fail(e);
  if ((e = TRITONSERVER_ServerInferAsync(m->server, req, nullptr))) return fail(e);
  return nullptr;
}

}  // namespace

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend*) {
  uint32_t major = 0, minor = 0;
  RETURN_IF_ERR(TRITONBACKEND_ApiVersion(&major, &minor));
  if (major != DETOKENIZER_BACKEND_API_MAJOR || minor < DETOKENIZER_BACKEND_API_MINOR)
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_UNSUPPORTED,
                                 ("detokenizer: backend API " + std::to_string(major) + "." + std::to_string(minor) +
                                  " is not compatible with 1.19").c_str());
  Log(TRITONSERVER_LOG_INFO, __LINE__, "detokenizer: backend API " + std::to_string(major) + "." + std::to_string(minor));
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  auto* m = new ModelState();
  TRITONSERVER_Error* e = TRITONBACKEND_ModelServer(model, &m->server);
  TRITONBACKEND_ArtifactType type;
  const char* location = nullptr;
  if (!e) e = TRITONBACKEND_ModelRepository(model, &type, &location);
  if (!e) {
    // token table: uint32 count, then per id uint32 length + bytes (little-endian)
    std::string path = std::string(location) + "/token_table.bin";
    std::ifstream f(path, std::ios::binary);
    uint32_t count = 0;
    if (!f.read(reinterpret_cast<char*>(&count), 4)) {
      e = TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_NOT_FOUND, ("detokenizer: cannot read " + path).c_str());
    } else {
      m->table.resize(count);
      for (uint32_t i = 0; i < count && !e; ++i) {
        uint32_t len = 0;
        if (!f.read(reinterpret_cast<char*>(&len), 4)) { e = TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, "detokenizer: truncated table"); break; }
        m->table[i].resize(len);
        if (len && !f.read(&m->table[i][0], len)) e = TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, "detokenizer: truncated table");
      }
    }
  }
  if (!e) {
    // parameters { key: "min_response_interval_us" value { string_value: "2000" } }
    TRITONSERVER_Message* config = nullptr;
    e = TRITONBACKEND_ModelConfig(model, 1, &config);
    const char* json = nullptr;
    size_t size = 0;
    if (!e) e = TRITONSERVER_MessageSerializeToJson(config, &json, &size);
    if (!e) {
      std::string j(json, size);
      const std::string key = "\"min_response_interval_us\":{\"string_value\":\"";
      size_t at = j.find(key);
      if (at != std::string::npos) m->min_interval = std::chrono::microseconds(std::atol(j.c_str() + at + key.size()));
      at = j.find("\"engine_model\":{\"string_value\":\"");
      if (at != std::string::npos) {
        at += std::strlen("\"engine_model\":{\"string_value\":\"");
        m->engine = j.substr(at, j.find('"', at) - at);
      }
    }
    if (config) TRITONSERVER_MessageDelete(config);
  }
  if (!e) e = TRITONSERVER_ResponseAllocatorNew(&m->allocator, Alloc, Release, nullptr);
  if (!e) e = TRITONBACKEND_ModelSetState(model, m);
  if (e) { delete m; return e; }
  if (m->min_interval.count() > 0) m->flusher = std::thread(FlushLoop, m);
  Log(TRITONSERVER_LOG_INFO, __LINE__, "detokenizer: token table of " + std::to_string(m->table.size()) +
      " ids, engine " + m->engine + ", min response interval " +
      std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(m->min_interval).count()) + " us");
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_ModelState(model, &state));
  auto* m = static_cast<ModelState*>(state);
  if (m) {
    if (m->flusher.joinable()) {
      { std::lock_guard<std::mutex> q(m->qmu); m->stopping = true; }
      m->qcv.notify_all();
      m->flusher.join();
    }
    if (m->allocator) TRITONSERVER_ResponseAllocatorDelete(m->allocator);
    delete m;
  }
  return nullptr;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance*) { return nullptr; }
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance*) { return nullptr; }

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests, const uint32_t request_count) {
  TRITONBACKEND_Model* model;
  RETURN_IF_ERR(TRITONBACKEND_ModelInstanceModel(instance, &model));
  void* state = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_ModelState(model, &state));
  auto* m = static_cast<ModelState*>(state);
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    auto* s = new Stream();
    s->model = m;
    TRITONSERVER_Error* e = TRITONBACKEND_ResponseFactoryNew(&s->factory, request);
    if (e) {  // cannot answer at all: let Triton fail the request
      delete s;
      TRITONSERVER_ErrorDelete(e);
      TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL);
      continue;
    }
    bool stop = false;
    e = ReadRequest(request, s, &stop);
    // The inputs are copied: the client request can go now (the factory answers it).
    TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL);
    if (!e && stop) {  // the tokenizer model carries out a stop; here it is only answered
      TRITONBACKEND_ResponseFactorySendFlags(s->factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL);
      TRITONBACKEND_ResponseFactoryDelete(s->factory);
      delete s;
      continue;
    }
    if (!e) e = StartEngine(m, s);
    if (e) {
      SendError(s->factory, TRITONSERVER_ErrorMessage(e), TRITONSERVER_ErrorCode(e));
      TRITONSERVER_ErrorDelete(e);
      TRITONBACKEND_ResponseFactoryDelete(s->factory);
      delete s;
    }
  }
  return nullptr;
}

}  // extern "C"
