// The streaming detokenizer, a Triton backend in C++: the decoupled `postprocessing` model.
// It calls the `tensorrt_llm` model in-process through the server object
// (TRITONSERVER_ServerInferAsync), turns each engine response's new token ids into whole
// UTF-8 text through the token tables written from the tokenizer (mixtral_triton.text),
// cuts the text before the first stop string, and streams text_output / finish_reason /
// prompt_tokens / completion_tokens (and num_input_tokens / num_output_tokens when asked).
// No Python stub, so no IPC round trip per response, and no network hop to the engine.
//
// Cancellation is in-process too: a `stop` request (STOP true) for a client request id ends
// that id's streams here at once ("cancelled") and cancels their engine requests
// (TRITONSERVER_InferenceRequestCancel; TensorRT-LLM's backend polls for it every
// cancellation_check_period_ms). A matched stop string ends its stream the same way, "stop".
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "text_rules.h"
#include "triton_api.h"

namespace {

using mixtral_detokenizer::CompletionText;

#define RETURN_IF_ERR(X)                 \
  do {                                   \
    TRITONSERVER_Error* e__ = (X);       \
    if (e__ != nullptr) return e__;      \
  } while (false)

void Log(TRITONSERVER_LogLevel level, int line, const std::string& msg) {
  TRITONSERVER_Error* e = TRITONSERVER_LogMessage(level, "detokenizer.cc", line, msg.c_str());
  if (e) TRITONSERVER_ErrorDelete(e);
}

void LogIfError(TRITONSERVER_Error* e, int line, const char* what) {
  if (e == nullptr) return;
  Log(TRITONSERVER_LOG_ERROR, line, std::string("detokenizer: ") + what + ": " + TRITONSERVER_ErrorMessage(e));
  TRITONSERVER_ErrorDelete(e);
}

std::string Lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

struct Stream;
using Clock = std::chrono::steady_clock;

struct ModelState {
  // Coalescing (as MIN_RESPONSE_INTERVAL_US in __init__.py says why): at most one response
  // per stream per interval; text that comes sooner waits for the flusher thread (or the
  // next engine response, or the end). 0: one response per engine response.
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
  // token id -> bytes: [0] special tokens empty (skip_special_tokens true), [1] their text
  std::vector<std::string> tables[2];
  std::string engine = "tensorrt_llm";
  // The streams running, by the client's request id, so that a `stop` finds them. Lock
  // order: runs_mu, never taken while a stream's mutex is held.
  std::mutex runs_mu;
  std::unordered_multimap<std::string, Stream*> runs;
};

// One client request: lives until the engine has answered it for the last time and has
// released its request (which points at our input copies).
struct Stream {
  ModelState* model = nullptr;
  TRITONBACKEND_ResponseFactory* factory = nullptr;
  TRITONSERVER_InferenceRequest* engine_request = nullptr;  // deleted with the stream
  std::string client_id;  // the client's request id: what a `stop` names
  struct EngineInput {
    std::string name;  // the engine's (lower-case) input name
    TRITONSERVER_DataType datatype;
    std::vector<int64_t> shape;
    std::string data;
  };
  std::vector<EngineInput> engine_inputs;  // copied: they must outlive the engine request
  const std::vector<std::string>* table = nullptr;
  int32_t input_length = 0, max_tokens = 0;
  bool streaming = true;  // false: one response, at the end
  bool yes = true;
  bool count_input = false, count_output = false;  // RETURN_NUM_INPUT/OUTPUT_TOKENS
  std::string echo;  // the prompt, first, when the client asked for it in the output

  std::mutex mu;        // guards what follows
  CompletionText text;
  std::string held;     // whole text not sent yet (coalescing)
  Clock::time_point last_send{};
  bool armed = false;   // queued on the flusher
  int32_t completion_tokens = 0;
  int32_t counted = 0;  // completion tokens reported in num_output_tokens so far
  bool done = false;    // the client has had its final response
  bool engine_done = false;  // the engine has sent its final response
  std::atomic<int> refs{2};  // the engine's final response + the engine request's release

  ~Stream() {
    if (engine_request) LogIfError(TRITONSERVER_InferenceRequestDelete(engine_request), __LINE__, "delete request");
    if (factory) LogIfError(TRITONBACKEND_ResponseFactoryDelete(factory), __LINE__, "delete factory");
  }

  void Unref() {
    if (refs.fetch_sub(1) == 1) delete this;
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

// Sends a text response (final: with the finish reason and the FINAL flag). The counts are
// TensorRT-LLM's own, each only when asked: num_input_tokens the prompt's tokens,
// num_output_tokens the tokens since the previous response (they add up to the
// completion's). Called with the stream's mutex held, so responses go out in order.
void SendText(Stream* s, const std::string& text, const std::string& reason, bool final) {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, s->factory);
  if (e == nullptr) e = AddOutputBytes(r, "text_output", text);
  if (e == nullptr) e = AddOutputBytes(r, "finish_reason", reason);
  if (e == nullptr) e = AddOutputInt(r, "prompt_tokens", s->input_length);
  if (e == nullptr) e = AddOutputInt(r, "completion_tokens", s->completion_tokens);
  if (e == nullptr && s->count_input) e = AddOutputInt(r, "num_input_tokens", s->input_length);
  if (e == nullptr && s->count_output) {
    e = AddOutputInt(r, "num_output_tokens", s->completion_tokens - s->counted);
    s->counted = s->completion_tokens;
  }
  const uint32_t flags = final ? uint32_t(TRITONSERVER_RESPONSE_COMPLETE_FINAL) : 0u;
  if (e != nullptr) {
    Log(TRITONSERVER_LOG_ERROR, __LINE__, std::string("detokenizer: building a response: ") + TRITONSERVER_ErrorMessage(e));
    if (r) {
      LogIfError(TRITONBACKEND_ResponseSend(r, flags, e), __LINE__, "send");  // the error goes to the client
    } else if (final) {
      LogIfError(TRITONBACKEND_ResponseFactorySendFlags(s->factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL),
                 __LINE__, "send flags");
    }
    TRITONSERVER_ErrorDelete(e);  // ResponseSend does not take ownership of the error
    return;
  }
  LogIfError(TRITONBACKEND_ResponseSend(r, flags, nullptr), __LINE__, "send");
}

void SendError(TRITONBACKEND_ResponseFactory* factory, const std::string& msg,
               TRITONSERVER_Error_Code code = TRITONSERVER_ERROR_INTERNAL) {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, factory);
  if (e) {
    TRITONSERVER_ErrorDelete(e);
    LogIfError(TRITONBACKEND_ResponseFactorySendFlags(factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL), __LINE__,
               "send flags");
    return;
  }
  TRITONSERVER_Error* err = TRITONSERVER_ErrorNew(code, msg.c_str());
  LogIfError(TRITONBACKEND_ResponseSend(r, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err), __LINE__, "send");
  TRITONSERVER_ErrorDelete(err);  // ResponseSend does not take ownership of the error
}

// An engine error as the client gets it (mixtral_triton.protocol.errors.relayed): a message
// that carries one of our codes keeps it; Triton's words for overload or a dead stub become
// `unavailable` (retry later); anything else `internal`, after "generation failed: ".
std::string Relayed(const std::string& message) {
  for (const char* kind : {"[invalid_argument", "[unavailable", "[internal"}) {
    const size_t at = message.find(kind);
    if (at == std::string::npos) continue;
    const size_t close = message.find("] ", at);
    if (close == std::string::npos) continue;
    bool code = true;  // [kind] or [kind:field], field of [A-Za-z0-9_]
    const size_t after = at + std::strlen(kind);
    if (after != close) {
      code = message[after] == ':' && close > after + 1;
      for (size_t i = after + 1; code && i < close; ++i)
        code = std::isalnum(static_cast<unsigned char>(message[i])) || message[i] == '_';
    }
    if (code) return message;
  }
  const bool overload = message.find("Exceeds maximum queue size") != std::string::npos ||
                        message.find("is not healthy") != std::string::npos ||
                        message.find("Failed to obtain the health mutex") != std::string::npos;
  return std::string(overload ? "[unavailable]" : "[internal]") + " generation failed: " + message;
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

// The engine is done with the request's inputs. The request itself stays (deleted with the
// stream): a released request can still be cancelled, and the engine may answer it long
// after releasing it (TensorRT-LLM's backend releases a request once it has queued it).
void EngineRequestReleased(TRITONSERVER_InferenceRequest*, const uint32_t flags, void* userp) {
  if (flags & TRITONSERVER_REQUEST_RELEASE_ALL) static_cast<Stream*>(userp)->Unref();
}

void Unregister(Stream* s) {
  if (s->client_id.empty()) return;
  std::lock_guard<std::mutex> lock(s->model->runs_mu);
  auto range = s->model->runs.equal_range(s->client_id);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == s) {
      s->model->runs.erase(it);
      return;
    }
  }
}

// Ends the stream for the client now, with the text waiting to go and `reason`, and cancels
// its engine request if the engine is still at it. With the stream's mutex held.
void EndEarly(Stream* s, const std::string& text, const char* reason) {
  s->done = true;
  SendText(s, s->held + text, reason, true);
  s->held.clear();
  if (!s->engine_done && s->engine_request != nullptr)
    LogIfError(TRITONSERVER_InferenceRequestCancel(s->engine_request), __LINE__, "cancel the engine request");
}

// New text of a stream that goes on: out at once, held for the flusher, or (not streaming)
// kept for the end. With the stream's mutex held.
void Deliver(Stream* s, const std::string& text) {
  if (text.empty()) return;
  if (!s->streaming) {
    s->held += text;
    return;
  }
  if (s->model->min_interval.count() == 0) {
    SendText(s, text, "", false);
    return;
  }
  s->held += text;
  if (s->armed) return;
  const auto now = Clock::now();
  if (now - s->last_send >= s->model->min_interval) {
    SendText(s, s->held, "", false);
    s->held.clear();
    s->last_send = now;
    return;
  }
  s->armed = true;
  s->refs.fetch_add(1);
  ModelState* m = s->model;
  std::lock_guard<std::mutex> q(m->qmu);
  m->queue.emplace_back(s->last_send + m->min_interval, s);
  m->qcv.notify_one();
}

// The new token ids of one engine response, as text (stop strings applied); an error
// message in `failure` for an id outside the vocabulary. With the stream's mutex held.
std::string Decode(Stream* s, TRITONSERVER_InferenceResponse* response, std::string& failure) {
  uint32_t count = 0;
  LogIfError(TRITONSERVER_InferenceResponseOutputCount(response, &count), __LINE__, "output count");
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
    TRITONSERVER_Error* e = TRITONSERVER_InferenceResponseOutput(response, i, &name, &dt, &shape, &dims, &base,
                                                                 &bytes, &mt, &mid, &up);
    if (e != nullptr) {
      LogIfError(e, __LINE__, "engine output");
      continue;
    }
    if (std::strcmp(name, "output_ids") == 0) {
      ids = static_cast<const int32_t*>(base);
      n_ids = bytes / 4;
    } else if (std::strcmp(name, "sequence_length") == 0 && bytes >= 4) {
      seq_len = *static_cast<const int32_t*>(base);
    }
  }
  // sequence_length bounds the valid ids (it counts only new tokens, the prompt excluded)
  if (seq_len >= 0 && static_cast<size_t>(seq_len) < n_ids) n_ids = seq_len;
  const std::vector<std::string>& table = *s->table;
  std::string bytes;
  for (size_t k = 0; k < n_ids; ++k) {
    if (ids[k] < 0 || static_cast<size_t>(ids[k]) >= table.size()) {
      failure = "token id " + std::to_string(ids[k]) + " is outside the vocabulary 0.." +
                std::to_string(table.size() - 1);
      return "";
    }
    bytes += table[ids[k]];
  }
  s->completion_tokens += static_cast<int32_t>(n_ids);
  return s->text.Push(bytes);
}

// One engine response (or a flags-only final): new tokens -> text -> the client.
void EngineResponse(TRITONSERVER_InferenceResponse* response, const uint32_t flags, void* userp) {
  Stream* s = static_cast<Stream*>(userp);
  const bool final = (flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL) != 0;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (final) s->engine_done = true;
    if (!s->done) {
      std::string failure, text;
      TRITONSERVER_Error_Code failure_code = TRITONSERVER_ERROR_INTERNAL;
      if (response != nullptr) {
        TRITONSERVER_Error* err = TRITONSERVER_InferenceResponseError(response);
        if (err != nullptr) {
          failure = Relayed(TRITONSERVER_ErrorMessage(err));  // owned by the response
          failure_code = TRITONSERVER_ErrorCode(err);  // an overload stays UNAVAILABLE
        } else {
          text = Decode(s, response, failure);
        }
      }
      if (!failure.empty()) {
        s->done = true;
        SendError(s->factory, failure, failure_code);
      } else if (s->text.stopped()) {  // tokens after the stop are not counted, nor sent
        EndEarly(s, text, "stop");
      } else if (final) {
        text += s->text.Finish();
        if (s->text.stopped()) {
          EndEarly(s, text, "stop");
        } else {
          s->done = true;
          SendText(s, s->held + text, s->completion_tokens >= s->max_tokens ? "length" : "stop", true);
          s->held.clear();
        }
      } else {
        Deliver(s, text);
      }
    }
  }
  if (response != nullptr) LogIfError(TRITONSERVER_InferenceResponseDelete(response), __LINE__, "delete response");
  if (final) {
    Unregister(s);
    s->Unref();
  }
}

// A `stop` for `client_id`: ends each of its streams now ("cancelled") and cancels their
// engine requests.
void CancelRuns(ModelState* m, const std::string& client_id) {
  std::vector<Stream*> found;
  {
    std::lock_guard<std::mutex> lock(m->runs_mu);
    auto range = m->runs.equal_range(client_id);
    for (auto it = range.first; it != range.second; ++it) {
      it->second->refs.fetch_add(1);  // kept while cancelled below, outside the registry's lock
      found.push_back(it->second);
    }
  }
  for (Stream* s : found) {
    {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->done) EndEarly(s, "", "cancelled");
    }
    s->Unref();
  }
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

// The strings of a BYTES tensor (each a 4-byte little-endian length, then the bytes).
std::vector<std::string> Strings(const std::string& data) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at + 4 <= data.size()) {
    uint32_t len;
    std::memcpy(&len, data.data() + at, 4);
    at += 4;
    if (len > data.size() - at) break;
    out.emplace_back(data, at, len);
    at += len;
  }
  return out;
}

// Reads one client request: the engine's inputs (upper-cased in the model config) are
// copied for the engine, the detokenizer's own are read.
TRITONSERVER_Error* ReadRequest(TRITONBACKEND_Request* request, Stream* s, bool* stop) {
  const char* id = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_RequestId(request, &id));
  s->client_id = id ? id : "";
  uint32_t count = 0;
  RETURN_IF_ERR(TRITONBACKEND_RequestInputCount(request, &count));
  bool skip_special = true;
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
    } else if (field == "STOP_STRINGS") {
      for (std::string& stop : Strings(data)) s->text.stops.Add(std::move(stop));
    } else if (field == "ECHO_TEXT") {
      for (const std::string& text : Strings(data)) s->echo += text;
    } else if (field == "INCLUDE_STOP_STR_IN_OUTPUT") {
      s->text.include_stop = FirstFlag(data);
    } else if (field == "RETURN_NUM_INPUT_TOKENS") {
      s->count_input = FirstFlag(data);
    } else if (field == "RETURN_NUM_OUTPUT_TOKENS") {
      s->count_output = FirstFlag(data);
    } else if (field == "SKIP_SPECIAL_TOKENS") {
      skip_special = data.empty() || FirstFlag(data);
    } else if ((field == "STOP_WORDS_LIST" || field == "BAD_WORDS_LIST") && OnlyPadding(data, shape, dims)) {
      continue;
    } else {
      if (field == "INPUT_LENGTHS") s->input_length = FirstInt32(data);
      if (field == "REQUEST_OUTPUT_LEN") s->max_tokens = FirstInt32(data);
      s->engine_inputs.push_back({Lower(field), datatype, std::vector<int64_t>(shape, shape + dims), std::move(data)});
    }
  }
  s->table = &s->model->tables[skip_special ? 0 : 1];
  return nullptr;
}

// Builds the engine request and hands it to the server. On success the stream is
// registered under its client id (before the engine can answer, so that its final finds
// it); on an error nothing is left registered and the caller still owns the stream.
TRITONSERVER_Error* StartEngine(ModelState* m, Stream* s) {
  TRITONSERVER_InferenceRequest* req = nullptr;
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestNew(&req, m->server, m->engine.c_str(), -1));
  s->engine_request = req;  // deleted with the stream
  for (const auto& input : s->engine_inputs) {
    RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddInput(req, input.name.c_str(), input.datatype,
                                                        input.shape.data(), input.shape.size()));
    RETURN_IF_ERR(TRITONSERVER_InferenceRequestAppendInputData(req, input.name.c_str(), input.data.data(),
                                                               input.data.size(), TRITONSERVER_MEMORY_CPU, 0));
  }
  // Always stream from the engine, without the prompt: a stop string found in the text can
  // then end the generation (and free its batch slot) early, also for a client that wants
  // one response.
  const int64_t flag_shape[2] = {1, 1};
  for (const char* name : {"streaming", "exclude_input_in_output"}) {
    RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddInput(req, name, TRITONSERVER_TYPE_BOOL, flag_shape, 2));
    RETURN_IF_ERR(TRITONSERVER_InferenceRequestAppendInputData(req, name, &s->yes, 1, TRITONSERVER_MEMORY_CPU, 0));
  }
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddRequestedOutput(req, "output_ids"));
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddRequestedOutput(req, "sequence_length"));
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestSetReleaseCallback(req, EngineRequestReleased, s));
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestSetResponseCallback(req, m->allocator, nullptr, EngineResponse, s));
  if (!s->client_id.empty()) {
    std::lock_guard<std::mutex> lock(m->runs_mu);
    m->runs.emplace(s->client_id, s);
  }
  TRITONSERVER_Error* e = TRITONSERVER_ServerInferAsync(m->server, req, nullptr);
  if (e != nullptr) Unregister(s);
  return e;
}

// Reads a token table: uint32 count, then per id uint32 length + bytes (little-endian).
TRITONSERVER_Error* ReadTable(const std::string& path, std::vector<std::string>& table) {
  std::ifstream f(path, std::ios::binary);
  uint32_t count = 0;
  if (!f.read(reinterpret_cast<char*>(&count), 4))
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_NOT_FOUND, ("detokenizer: cannot read " + path).c_str());
  table.resize(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0;
    if (!f.read(reinterpret_cast<char*>(&len), 4))
      return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, ("detokenizer: truncated " + path).c_str());
    table[i].resize(len);
    if (len && !f.read(&table[i][0], len))
      return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, ("detokenizer: truncated " + path).c_str());
  }
  return nullptr;
}

// A string parameter of the model config's JSON, or "" when absent.
std::string Parameter(const std::string& json, const std::string& key) {
  const std::string open = "\"" + key + "\":{\"string_value\":\"";
  size_t at = json.find(open);
  if (at == std::string::npos) return "";
  at += open.size();
  return json.substr(at, json.find('"', at) - at);
}

TRITONSERVER_Error* ReadConfig(TRITONBACKEND_Model* model, ModelState* m) {
  TRITONSERVER_Message* config = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_ModelConfig(model, 1, &config));
  const char* json = nullptr;
  size_t size = 0;
  TRITONSERVER_Error* e = TRITONSERVER_MessageSerializeToJson(config, &json, &size);
  if (e == nullptr) {
    const std::string j(json, size);
    const std::string interval = Parameter(j, "min_response_interval_us");
    if (!interval.empty()) m->min_interval = std::chrono::microseconds(std::atol(interval.c_str()));
    const std::string engine = Parameter(j, "engine_model");
    if (!engine.empty()) m->engine = engine;
  }
  TRITONSERVER_MessageDelete(config);
  return e;
}

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Reports a request's statistics (what Triton's statistics and perf_analyzer read: the
// time to read it and hand it to the engine) and releases it.
void Finish(TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, bool success, uint64_t start) {
  const uint64_t end = NowNs();
  LogIfError(TRITONBACKEND_ModelInstanceReportStatistics(instance, request, success, start, start, end, end),
             __LINE__, "statistics");
  LogIfError(TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL), __LINE__, "release");
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
  if (!e) e = ReadTable(std::string(location) + "/token_table.bin", m->tables[0]);
  if (!e) e = ReadTable(std::string(location) + "/token_table_special.bin", m->tables[1]);
  if (!e) e = ReadConfig(model, m);
  if (!e) e = TRITONSERVER_ResponseAllocatorNew(&m->allocator, Alloc, Release, nullptr);
  if (!e) e = TRITONBACKEND_ModelSetState(model, m);
  if (e) {
    if (m->allocator) TRITONSERVER_ResponseAllocatorDelete(m->allocator);
    delete m;
    return e;
  }
  if (m->min_interval.count() > 0) m->flusher = std::thread(FlushLoop, m);
  Log(TRITONSERVER_LOG_INFO, __LINE__, "detokenizer: token table of " + std::to_string(m->tables[0].size()) +
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
  const uint64_t exec_start = NowNs();
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    const uint64_t start = NowNs();
    auto* s = new Stream();
    s->model = m;
    TRITONSERVER_Error* e = TRITONBACKEND_ResponseFactoryNew(&s->factory, request);
    if (e) {  // cannot answer at all: let Triton fail the request
      delete s;
      TRITONSERVER_ErrorDelete(e);
      Finish(instance, request, false, start);
      continue;
    }
    bool stop = false;
    e = ReadRequest(request, s, &stop);
    if (!e && stop) {  // a `stop`: end its client id's streams, then answer it
      CancelRuns(m, s->client_id);
      LogIfError(TRITONBACKEND_ResponseFactorySendFlags(s->factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL), __LINE__,
                 "send flags");
      delete s;
      Finish(instance, request, true, start);
      continue;
    }
    if (!e && !s->echo.empty()) {  // the prompt first: its own response, or the text's start
      std::lock_guard<std::mutex> lock(s->mu);
      if (s->streaming) SendText(s, s->echo, "", false);
      else s->held = s->echo;
    }
    if (!e) e = StartEngine(m, s);
    if (e) {
      SendError(s->factory, TRITONSERVER_ErrorMessage(e), TRITONSERVER_ErrorCode(e));
      TRITONSERVER_ErrorDelete(e);
      delete s;
    }
    // The inputs are copied: the client request can go (the factory answers it).
    Finish(instance, request, e == nullptr, start);
  }
  const uint64_t exec_end = NowNs();
  LogIfError(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, request_count, exec_start, exec_start,
                                                               exec_end, exec_end),
             __LINE__, "batch statistics");
  return nullptr;
}

}  // extern "C"
