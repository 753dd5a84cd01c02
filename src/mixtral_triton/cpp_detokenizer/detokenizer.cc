// The streaming detokenizer, a Triton backend in C++: the decoupled `postprocessing` model.
// It calls the `tensorrt_llm` model in-process through the server object
// (TRITONSERVER_ServerInferAsync), turns each engine response's new token ids into whole
// UTF-8 text through the token tables written from the tokenizer (mixtral_triton.text),
// cuts the text before the first stop string, and streams text_output / finish_reason /
// prompt_tokens / completion_tokens / num_input_tokens / num_output_tokens.
// A request may ask for several completions (NUM_RETURN_SEQUENCES: the engine's
// num_return_sequences, each engine response naming its sequence_index): each has its own
// text, stop strings, finish reason and counts, and its responses carry its sequence_index.
// With RETURN_LOG_PROBS each response carries the log probabilities and the bytes of the
// tokens whose text it is the first to send (output_log_probs, output_token_bytes), and
// the running sum (cum_log_probs).
// No Python stub, so no IPC round trip per response, and no network hop to the engine.
//
// Cancellation is in-process too: a `stop` request (STOP true) for a client request id ends
// that id's streams here at once ("cancelled") and cancels their engine requests
// (TRITONSERVER_InferenceRequestCancel; TensorRT-LLM's backend polls for it every
// cancellation_check_period_ms). A matched stop string, a client request the server marked
// cancelled and a failed stream end the same way, so no batch slot outlives its client.
//
// It runs inside tritonserver: an exception that left it would end the server and every
// stream with it. Every entry point and callback is an exception barrier (Guarded, and the
// catch blocks of the callbacks): what is caught becomes an `[internal]` error for that
// request or model, logged, and the server goes on.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "text_rules.h"
#include "triton_api.h"

namespace {

using mixtral_detokenizer::CompletionText;
using mixtral_detokenizer::IsValidUtf8;

#define RETURN_IF_ERR(X)                 \
  do {                                   \
    TRITONSERVER_Error* e__ = (X);       \
    if (e__ != nullptr) return e__;      \
  } while (false)

// ---- logging and errors that never throw (they run in catch blocks and destructors) ----
void Log(TRITONSERVER_LogLevel level, int line, const char* msg) noexcept {
  TRITONSERVER_Error* e = TRITONSERVER_LogMessage(level, "detokenizer.cc", line, msg);
  if (e) TRITONSERVER_ErrorDelete(e);
}

void Log(TRITONSERVER_LogLevel level, int line, const std::string& msg) noexcept { Log(level, line, msg.c_str()); }

void LogIfError(TRITONSERVER_Error* e, int line, const char* what) noexcept {
  if (e == nullptr) return;
  char text[1024];
  std::snprintf(text, sizeof text, "detokenizer: %s: %s", what, TRITONSERVER_ErrorMessage(e));
  Log(TRITONSERVER_LOG_ERROR, line, text);
  TRITONSERVER_ErrorDelete(e);
}

// What an exception caught at `where` becomes: an `[internal]` error (logged).
TRITONSERVER_Error* CaughtError(const char* where, const char* what) noexcept {
  char text[1024];
  std::snprintf(text, sizeof text, "[internal] detokenizer: %s: %s", where, what);
  Log(TRITONSERVER_LOG_ERROR, __LINE__, text);
  return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, text);
}

// Runs `body` (returning a TRITONSERVER_Error*) so that no exception leaves it.
template <typename Body>
TRITONSERVER_Error* Guarded(const char* where, Body&& body) noexcept {
  try {
    return body();
  } catch (const std::exception& e) {
    return CaughtError(where, e.what());
  } catch (...) {
    return CaughtError(where, "an exception of unknown type");
  }
}

TRITONSERVER_Error* InvalidArgument(const std::string& field, const std::string& rule) {
  return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG,
                               ("[invalid_argument:" + field + "] " + field + " " + rule).c_str());
}

#ifdef MIXTRAL_DETOKENIZER_FAULTS
// Test builds only (cpp_detokenizer.build with faults): a client request id
// "fault:<where>" makes that point throw, so that tests can prove each exception barrier.
void Fault(const std::string& client_id, const char* where) {
  if (client_id.size() <= 6 || client_id.compare(0, 6, "fault:") != 0 || client_id.compare(6, std::string::npos, where) != 0)
    return;
  if (std::strcmp(where, "response") == 0)
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again), "injected fault");
  throw std::bad_alloc();
}

#else
inline void Fault(const std::string&, const char*) {}
#endif

std::string Lower(std::string text) {
  for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return text;
}

struct Stream;
using Clock = std::chrono::steady_clock;

// The most completions one request may ask for (NUM_RETURN_SEQUENCES), as the tokenizer
// model allows (mixtral_triton.protocol.ensemble.MAX_RETURN_SEQUENCES): each is a sequence in the engine's batch.
constexpr int32_t kMaxSequences = 8;

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
  // The engine's lengths (the fill writes them): what a request may ask, as the tokenizer
  // model checks them, for a client that calls this model directly.
  int64_t max_input_len = 0, max_seq_len = 0;
  // The streams running, by the client's request id, so that a `stop` finds them. Lock
  // order: runs_mu, never taken while a stream's mutex is held.
  std::mutex runs_mu;
  std::unordered_multimap<std::string, Stream*> runs;
};

// One client request. Deleted when its last reference goes: the engine's final response
// and the engine request's release hold one each (the engine may send its final before or
// after releasing the request: the reference engine releases it when its execute returns,
// TensorRT-LLM's backend after the final), execute holds one until it has handed the
// stream over, and a `stop` or the flusher hold one while they use it.
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
  int32_t sequences = 1;  // NUM_RETURN_SEQUENCES
  bool streaming = true;  // false: one response, at the end
  bool yes = true;
  bool log_probs = false;  // RETURN_LOG_PROBS
  std::string echo;  // the prompt, first, when the client asked for it in the output
  std::vector<std::string> stop_strings;
  bool include_stop = false;

  std::mutex mu;        // guards what follows
  // One completion: its text state, and what waits to go in its next response.
  struct Sequence {
    CompletionText text;
    std::string held;             // whole text not sent yet (coalescing, not streaming)
    std::vector<float> log_probs;  // of the tokens whose text has not gone out yet
    std::string token_bytes;      // those tokens' bytes, as BYTES elements
    uint32_t token_count = 0;     // tokens in token_bytes
    float cum_log_prob = 0;       // over every token sent
    int32_t completion_tokens = 0;
    int32_t counted = 0;  // completion tokens reported in num_output_tokens so far
    bool done = false;    // its last response has gone
  };
  std::vector<Sequence> seqs;
  Clock::time_point last_send{};
  bool armed = false;   // queued on the flusher
  bool done = false;    // the client has had its final response
  bool in_engine = false;    // the server has taken the engine request
  bool engine_done = false;  // the engine has sent its final response (or never will)
  std::atomic<int> refs{3};  // the engine's final, the engine request's release, execute

  ~Stream() {
    if (engine_request) LogIfError(TRITONSERVER_InferenceRequestDelete(engine_request), __LINE__, "delete request");
    if (factory) LogIfError(TRITONBACKEND_ResponseFactoryDelete(factory), __LINE__, "delete factory");
  }

  void Unref() noexcept {
    if (refs.fetch_sub(1) == 1) delete this;
  }
};

// Adds a [1, 1] output holding `content` (already in the tensor's wire form).
TRITONSERVER_Error* AddOutput(TRITONBACKEND_Response* r, const char* name, TRITONSERVER_DataType type,
                              const void* content, size_t size) {
  TRITONBACKEND_Output* out;
  const int64_t shape[2] = {1, 1};
  RETURN_IF_ERR(TRITONBACKEND_ResponseOutput(r, &out, name, type, shape, 2));
  void* buf;
  TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
  int64_t mid = 0;
  RETURN_IF_ERR(TRITONBACKEND_OutputBuffer(out, &buf, size, &mt, &mid));
  std::memcpy(buf, content, size);
  return nullptr;
}

// One BYTES element: a little-endian uint32 length, then the bytes.
TRITONSERVER_Error* AddOutputBytes(TRITONBACKEND_Response* r, const char* name, const std::string& v) {
  const uint32_t len = static_cast<uint32_t>(v.size());
  std::string element(reinterpret_cast<const char*>(&len), 4);
  element += v;
  return AddOutput(r, name, TRITONSERVER_TYPE_BYTES, element.data(), element.size());
}

TRITONSERVER_Error* AddOutputInt(TRITONBACKEND_Response* r, const char* name, int32_t v) {
  return AddOutput(r, name, TRITONSERVER_TYPE_INT32, &v, 4);
}

TRITONSERVER_Error* AddOutputFloats(TRITONBACKEND_Response* r, const char* name, const std::vector<float>& v) {
  TRITONBACKEND_Output* out;
  const int64_t shape[2] = {1, static_cast<int64_t>(v.size())};
  RETURN_IF_ERR(TRITONBACKEND_ResponseOutput(r, &out, name, TRITONSERVER_TYPE_FP32, shape, 2));
  void* buf;
  TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
  int64_t mid = 0;
  RETURN_IF_ERR(TRITONBACKEND_OutputBuffer(out, &buf, v.size() * sizeof(float), &mt, &mid));
  if (!v.empty()) std::memcpy(buf, v.data(), v.size() * sizeof(float));
  return nullptr;
}

// `count` BYTES elements already in their wire form (each a uint32 length, then the bytes).
TRITONSERVER_Error* AddOutputElements(TRITONBACKEND_Response* r, const char* name, const std::string& elements,
                                      uint32_t count) {
  TRITONBACKEND_Output* out;
  const int64_t shape[2] = {1, static_cast<int64_t>(count)};
  RETURN_IF_ERR(TRITONBACKEND_ResponseOutput(r, &out, name, TRITONSERVER_TYPE_BYTES, shape, 2));
  void* buf;
  TRITONSERVER_MemoryType mt = TRITONSERVER_MEMORY_CPU;
  int64_t mid = 0;
  RETURN_IF_ERR(TRITONBACKEND_OutputBuffer(out, &buf, elements.size(), &mt, &mid));
  if (!elements.empty()) std::memcpy(buf, elements.data(), elements.size());
  return nullptr;
}

// The outputs of sequence `q`'s response: its text and counts, its sequence_index, and the
// log probabilities and bytes of the tokens this text is the first to carry with their
// running sum. Every response carries every output the model declares: perf_analyzer (and
// so genai-perf) reads each declared output from each response, and for one that is absent
// or has no elements it records whatever its buffer held (seen: NaN floats, which leave its
// profile export empty). So without RETURN_LOG_PROBS the three log-probability outputs hold
// one placeholder each (0, "", 0), as upstream's Python postprocessing sent zeros.
TRITONSERVER_Error* AddSequenceOutputs(TRITONBACKEND_Response* r, Stream* s, size_t k, const std::string& text,
                                       const std::string& reason) {
  Stream::Sequence& q = s->seqs[k];
  RETURN_IF_ERR(AddOutputBytes(r, "text_output", text));
  RETURN_IF_ERR(AddOutputBytes(r, "finish_reason", reason));
  RETURN_IF_ERR(AddOutputInt(r, "prompt_tokens", s->input_length));
  RETURN_IF_ERR(AddOutputInt(r, "completion_tokens", q.completion_tokens));
  RETURN_IF_ERR(AddOutputInt(r, "num_input_tokens", s->input_length));
  RETURN_IF_ERR(AddOutputInt(r, "num_output_tokens", q.completion_tokens - q.counted));
  q.counted = q.completion_tokens;
  RETURN_IF_ERR(AddOutputInt(r, "sequence_index", static_cast<int32_t>(k)));
  if (!s->log_probs) {
    static const std::vector<float> kPlaceholder{0.0f};
    RETURN_IF_ERR(AddOutputFloats(r, "output_log_probs", kPlaceholder));
    RETURN_IF_ERR(AddOutputBytes(r, "output_token_bytes", std::string()));
    return AddOutputFloats(r, "cum_log_probs", kPlaceholder);
  }
  for (float p : q.log_probs) q.cum_log_prob += p;
  RETURN_IF_ERR(AddOutputFloats(r, "output_log_probs", q.log_probs));
  RETURN_IF_ERR(AddOutputElements(r, "output_token_bytes", q.token_bytes, q.token_count));
  RETURN_IF_ERR(AddOutputFloats(r, "cum_log_probs", {q.cum_log_prob}));
  q.log_probs.clear();
  q.token_bytes.clear();
  q.token_count = 0;
  return nullptr;
}

// Sends a text response of sequence `k` (final: with the FINAL flag, the request's last).
// Called with the stream's mutex held, so responses go out in order.
void SendText(Stream* s, size_t k, const std::string& text, const std::string& reason, bool final) {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, s->factory);
  if (e == nullptr) e = AddSequenceOutputs(r, s, k, text, reason);
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

// Sends what sequence `k` holds (its held text and `text`) unless it holds nothing.
void SendHeld(Stream* s, size_t k, const std::string& text = "") {
  Stream::Sequence& q = s->seqs[k];
  if (q.held.empty() && text.empty()) return;
  SendText(s, k, q.held + text, "", false);
  q.held.clear();
}

#ifdef MIXTRAL_DETOKENIZER_FAULTS
// "fault:hold-until-cancelled": execute sends one empty response (so that the test knows the
// request is here) and waits (at most 60 s) until the server has marked the request
// cancelled: the detokenizer then meets at its start a request already cancelled, as it
// meets one the ensemble cancelled while it queued.
void HoldUntilCancelled(Stream* s, TRITONBACKEND_Request* request) {
  if (s->client_id != "fault:hold-until-cancelled") return;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    SendText(s, 0, "", "", false);
  }
  bool cancelled = false;
  for (int waited_ms = 0; !cancelled && waited_ms < 60000; waited_ms += 10) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    TRITONSERVER_Error* e = TRITONBACKEND_RequestIsCancelled(request, &cancelled);
    if (e) TRITONSERVER_ErrorDelete(e);
  }
}
#else
inline void HoldUntilCancelled(Stream*, TRITONBACKEND_Request*) {}
#endif

// A final error response; never throws (failure paths call it).
void SendError(TRITONBACKEND_ResponseFactory* factory, const char* msg,
               TRITONSERVER_Error_Code code = TRITONSERVER_ERROR_INTERNAL) noexcept {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNewFromFactory(&r, factory);
  if (e) {
    TRITONSERVER_ErrorDelete(e);
    LogIfError(TRITONBACKEND_ResponseFactorySendFlags(factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL), __LINE__,
               "send flags");
    return;
  }
  TRITONSERVER_Error* err = TRITONSERVER_ErrorNew(code, msg);
  LogIfError(TRITONBACKEND_ResponseSend(r, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err), __LINE__, "send");
  TRITONSERVER_ErrorDelete(err);  // ResponseSend does not take ownership of the error
}

// An engine error as the client gets it (mixtral_triton.protocol.errors.relayed): a message
// that carries one of our codes keeps it; the server's words for overload or a dead model
// process (protocol.errors.TRITON_UNAVAILABLE: keep the two lists together) become
// `unavailable` (retry later, code UNAVAILABLE); anything else `internal`.
std::string Relayed(const std::string& message, TRITONSERVER_Error_Code* code) {
  for (const char* kind : {"[invalid_argument", "[unavailable", "[internal"}) {
    const size_t at = message.find(kind);
    if (at == std::string::npos) continue;
    const size_t close = message.find("] ", at);
    if (close == std::string::npos) continue;
    bool coded = true;  // [kind] or [kind:field], field of [A-Za-z0-9_]
    const size_t after = at + std::strlen(kind);
    if (after != close) {
      coded = message[after] == ':' && close > after + 1;
      for (size_t i = after + 1; coded && i < close; ++i)
        coded = std::isalnum(static_cast<unsigned char>(message[i])) || message[i] == '_';
    }
    if (coded) return message;
  }
  bool overload = message.find("Exceeds maximum queue size") != std::string::npos ||
                  message.find("is not healthy") != std::string::npos ||
                  message.find("Failed to obtain the health mutex") != std::string::npos;
  // TensorRT-LLM's executor: "Maximum queue size of <N> has been reached, please try again later"
  const std::string executor_full = "Maximum queue size of ";
  const size_t at = message.find(executor_full);
  if (at != std::string::npos) {
    size_t i = at + executor_full.size();
    const size_t digits = i;
    while (i < message.size() && std::isdigit(static_cast<unsigned char>(message[i]))) ++i;
    overload = overload || (i > digits && message.compare(i, 19, " has been reached, ") == 0);
  }
  if (overload) {
    *code = TRITONSERVER_ERROR_UNAVAILABLE;
    return "[unavailable] the engine cannot take the request now, retry later: " + message;
  }
  return "[internal] generation failed: " + message;
}

// ---- response allocator: plain CPU malloc ----
TRITONSERVER_Error* Alloc(TRITONSERVER_ResponseAllocator*, const char*, size_t byte_size,
                          TRITONSERVER_MemoryType, int64_t, void*, void** buffer, void** buffer_userp,
                          TRITONSERVER_MemoryType* actual_type, int64_t* actual_id) noexcept {
  *actual_type = TRITONSERVER_MEMORY_CPU;
  *actual_id = 0;
  *buffer_userp = nullptr;
  *buffer = byte_size == 0 ? nullptr : std::malloc(byte_size);
  if (byte_size != 0 && *buffer == nullptr)
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INTERNAL, "detokenizer: out of memory");
  return nullptr;
}

TRITONSERVER_Error* Release(TRITONSERVER_ResponseAllocator*, void* buffer, void*, size_t,
                            TRITONSERVER_MemoryType, int64_t) noexcept {
  std::free(buffer);
  return nullptr;
}

// The engine is done with the request's inputs. The request itself stays (deleted with the
// stream): a released request can still be cancelled, and the engine may answer it after
// releasing it.
void EngineRequestReleased(TRITONSERVER_InferenceRequest*, const uint32_t flags, void* userp) noexcept {
  if (flags & TRITONSERVER_REQUEST_RELEASE_ALL) static_cast<Stream*>(userp)->Unref();
}

void Unregister(Stream* s) noexcept {
  if (s->client_id.empty()) return;
  try {
    std::lock_guard<std::mutex> lock(s->model->runs_mu);
    auto range = s->model->runs.equal_range(s->client_id);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == s) {
        s->model->runs.erase(it);
        return;
      }
    }
  } catch (const std::exception& e) {
    Log(TRITONSERVER_LOG_ERROR, __LINE__, std::string("detokenizer: unregistering a stream: ") + e.what());
  }
}

// Cancels the stream's engine request if the engine is still at it. With the stream's mutex
// held. A request the server has not taken is not cancelled here: execute cancels it once
// the server has it (a stream can end before that, e.g. by a `stop`).
void CancelEngine(Stream* s) noexcept {
  if (s->in_engine && !s->engine_done && s->engine_request != nullptr)
    LogIfError(TRITONSERVER_InferenceRequestCancel(s->engine_request), __LINE__, "cancel the engine request");
}

// Ends sequence `k` with `text` (after what it holds) and `reason`. The request's last
// sequence to end sends the FINAL flag and cancels the engine request (the engine may still
// be at it: a stop string, a `stop`). With the stream's mutex held.
void EndSequence(Stream* s, size_t k, const std::string& text, const char* reason) {
  Stream::Sequence& q = s->seqs[k];
  q.done = true;
  const bool last = std::none_of(s->seqs.begin(), s->seqs.end(), [](const Stream::Sequence& o) { return !o.done; });
  SendText(s, k, q.held + text, reason, last);
  q.held.clear();
  if (last) {
    s->done = true;
    CancelEngine(s);
  }
}

// Ends every sequence still going, with `reason`, and the request. With the stream's mutex held.
void EndAll(Stream* s, const char* reason) {
  for (size_t k = 0; k < s->seqs.size(); ++k) {
    if (!s->seqs[k].done) EndSequence(s, k, "", reason);
  }
}

// Ends the stream for the client with an error, and cancels its engine request (its batch
// slot is of no use any more). With the stream's mutex held; never throws.
void EndWithError(Stream* s, const char* message, TRITONSERVER_Error_Code code) noexcept {
  if (!s->done) {
    s->done = true;
    SendError(s->factory, message, code);
  }
  CancelEngine(s);
}

// Sends what every sequence holds. With the stream's mutex held.
void SendAllHeld(Stream* s) {
  for (size_t k = 0; k < s->seqs.size(); ++k) {
    if (!s->seqs[k].done) SendHeld(s, k);
  }
}

// New text of sequence `k`, which goes on: out at once, held for the flusher, or (not
// streaming) kept for the end. With the stream's mutex held.
void Deliver(Stream* s, size_t k, const std::string& text) {
  if (text.empty()) return;  // log probabilities wait with the text they belong to
  Stream::Sequence& q = s->seqs[k];
  if (!s->streaming) {
    q.held += text;
    return;
  }
  if (s->model->min_interval.count() == 0) {
    SendText(s, k, text, "", false);
    return;
  }
  q.held += text;
  if (s->armed) return;
  const auto now = Clock::now();
  if (now - s->last_send >= s->model->min_interval) {
    SendAllHeld(s);
    s->last_send = now;
    return;
  }
  ModelState* m = s->model;
  {
    std::lock_guard<std::mutex> lock(m->qmu);
    m->queue.emplace_back(s->last_send + m->min_interval, s);  // may throw: nothing changed yet
    s->armed = true;
    s->refs.fetch_add(1);
  }
  m->qcv.notify_one();
}

// The new tokens of one engine response, as text of their sequence (stop strings applied;
// its index in `k`); an error message in `failure` for an id outside the vocabulary, a
// sequence index out of range or log probabilities missing. Tokens after the one that
// completed a stop string are not counted. With the stream's mutex held.
std::string Decode(Stream* s, TRITONSERVER_InferenceResponse* response, size_t* k, std::string& failure) {
  uint32_t count = 0;
  LogIfError(TRITONSERVER_InferenceResponseOutputCount(response, &count), __LINE__, "output count");
  const int32_t* ids = nullptr;
  const float* log_probs = nullptr;
  size_t n_ids = 0, n_log_probs = 0;
  int64_t seq_len = -1, index = 0;
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
    if (std::strcmp(name, "output_ids") == 0 && dt == TRITONSERVER_TYPE_INT32) {
      ids = static_cast<const int32_t*>(base);
      n_ids = bytes / 4;
    } else if (std::strcmp(name, "sequence_length") == 0 && dt == TRITONSERVER_TYPE_INT32 && bytes >= 4) {
      seq_len = *static_cast<const int32_t*>(base);
    } else if (std::strcmp(name, "sequence_index") == 0 && dt == TRITONSERVER_TYPE_INT32 && bytes >= 4) {
      index = *static_cast<const int32_t*>(base);
    } else if (std::strcmp(name, "output_log_probs") == 0 && dt == TRITONSERVER_TYPE_FP32) {
      // [1, beam 1, L]: streaming, L is every token of the sequence so far (the executor
      // sends its whole list); this response's tokens are the last ones
      log_probs = static_cast<const float*>(base);
      n_log_probs = bytes / 4;
    }
  }
  // sequence_length bounds the valid ids (it counts only new tokens, the prompt excluded)
  if (seq_len >= 0 && static_cast<size_t>(seq_len) < n_ids) n_ids = seq_len;
  if (index < 0 || index >= static_cast<int64_t>(s->seqs.size())) {
    failure = "[internal] generation failed: the engine sent sequence_index " + std::to_string(index) +
              " of a request for " + std::to_string(s->seqs.size()) + " sequences";
    return "";
  }
  *k = static_cast<size_t>(index);
  Stream::Sequence& q = s->seqs[*k];
  if (s->log_probs && n_log_probs < n_ids) {
    failure = "[internal] generation failed: the engine sent " + std::to_string(n_log_probs) +
              " output_log_probs for " + std::to_string(n_ids) + " tokens";
    return "";
  }
  if (s->log_probs) log_probs += n_log_probs - n_ids;
  const std::vector<std::string>& table = *s->table;
  for (size_t t = 0; t < n_ids; ++t) {
    if (ids[t] < 0 || static_cast<size_t>(ids[t]) >= table.size()) {
      failure = "[internal] generation failed: token id " + std::to_string(ids[t]) +
                " is outside the vocabulary 0.." + std::to_string(table.size() - 1);
      return "";
    }
  }
  if (q.done) return "";  // a sequence ended by a stop string: the engine may still send it tokens
  const size_t before = static_cast<size_t>(q.completion_tokens);
  std::string text;
  if (q.text.stops.stops.empty()) {  // no stop strings: the whole response at once
    std::string bytes;
    for (size_t t = 0; t < n_ids; ++t) bytes += table[ids[t]];
    q.completion_tokens += static_cast<int32_t>(n_ids);
    text = q.text.Push(bytes);
  } else {  // token by token, so that the count ends with the stop's last token
    for (size_t t = 0; t < n_ids && !q.text.stopped(); ++t) {
      text += q.text.Push(table[ids[t]]);
      ++q.completion_tokens;
    }
  }
  if (s->log_probs) {
    for (size_t t = 0; t < static_cast<size_t>(q.completion_tokens) - before; ++t) {
      const std::string& piece = table[ids[t]];
      const uint32_t len = static_cast<uint32_t>(piece.size());
      q.log_probs.push_back(log_probs[t]);
      q.token_bytes.append(reinterpret_cast<const char*>(&len), 4);
      q.token_bytes += piece;
      ++q.token_count;
    }
  }
  return text;
}

// The engine's final response: every sequence still going ends, with what it holds, the
// rest of its text and `length` (max_tokens reached) or `stop` (the end token, or a stop
// string found at the very end); sequence `k` also with `text`, the final response's own.
void FinishAll(Stream* s, size_t k, const std::string& text) {
  for (size_t j = 0; j < s->seqs.size(); ++j) {
    Stream::Sequence& q = s->seqs[j];
    if (q.done) continue;
    const std::string tail = (j == k ? text : std::string()) + q.text.Finish();
    const char* reason = q.text.stopped() || q.completion_tokens < s->max_tokens ? "stop" : "length";
    EndSequence(s, j, tail, reason);
  }
}

// One engine response (or a flags-only final): new tokens -> text -> the client. With the
// stream's mutex held.
void OnEngineResponse(Stream* s, TRITONSERVER_InferenceResponse* response, bool final) {
  if (final) s->engine_done = true;
  if (s->done) return;
  Fault(s->client_id, "response");
  bool cancelled = false;  // the client went away (a cancelled gRPC call, say)
  LogIfError(TRITONBACKEND_ResponseFactoryIsCancelled(s->factory, &cancelled), __LINE__, "is cancelled");
  if (cancelled) {
    EndAll(s, "cancelled");
    return;
  }
  std::string failure, text;
  size_t k = 0;
  TRITONSERVER_Error_Code failure_code = TRITONSERVER_ERROR_INTERNAL;
  if (response != nullptr) {
    TRITONSERVER_Error* err = TRITONSERVER_InferenceResponseError(response);
    if (err != nullptr) {
      failure = Relayed(TRITONSERVER_ErrorMessage(err), &failure_code);  // err is owned by the response
    } else {
      text = Decode(s, response, &k, failure);
    }
  }
  if (!failure.empty()) {
    EndWithError(s, failure.c_str(), failure_code);
  } else if (!s->seqs[k].done && s->seqs[k].text.stopped()) {  // tokens after the stop are not counted, nor sent
    EndSequence(s, k, text, "stop");
    if (final && !s->done) FinishAll(s, k, "");
  } else if (final) {
    FinishAll(s, k, text);
  } else {
    Deliver(s, k, text);
  }
}

// The engine's response callback (on the engine's threads: TensorRT-LLM's response thread
// on GPUs). An exception ends this stream with an error, never the server.
void EngineResponse(TRITONSERVER_InferenceResponse* response, const uint32_t flags, void* userp) noexcept {
  Stream* s = static_cast<Stream*>(userp);
  const bool final = (flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL) != 0;
  try {
    std::unique_lock<std::mutex> lock(s->mu);
    try {
      OnEngineResponse(s, response, final);
    } catch (const std::exception& e) {
      TRITONSERVER_Error* err = CaughtError("engine response", e.what());
      EndWithError(s, TRITONSERVER_ErrorMessage(err), TRITONSERVER_ERROR_INTERNAL);
      TRITONSERVER_ErrorDelete(err);
    }
  } catch (...) {  // the stream's mutex itself, or an exception of unknown type
    LogIfError(CaughtError("engine response", "an exception of unknown type or a lock failure"), __LINE__,
               "engine response");
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
    found.reserve(m->runs.count(client_id));
    auto range = m->runs.equal_range(client_id);
    for (auto it = range.first; it != range.second; ++it) {
      it->second->refs.fetch_add(1);  // kept while cancelled below, outside the registry's lock
      found.push_back(it->second);
    }
  }
  for (Stream* s : found) {
    try {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->done) EndAll(s, "cancelled");
    } catch (const std::exception& e) {
      LogIfError(CaughtError("stop", e.what()), __LINE__, "stop");
    }
    s->Unref();
  }
}

void FlushLoop(ModelState* m) noexcept {
  try {
    std::unique_lock<std::mutex> q(m->qmu);
    while (true) {
      if (m->stopping) break;
      if (m->queue.empty()) { m->qcv.wait(q); continue; }
      auto [deadline, s] = m->queue.front();
      if (Clock::now() < deadline) { m->qcv.wait_until(q, deadline); continue; }
      m->queue.pop_front();
      q.unlock();
      try {
        std::lock_guard<std::mutex> lock(s->mu);
        s->armed = false;
        if (!s->done) {
          SendAllHeld(s);
          s->last_send = Clock::now();
        }
      } catch (const std::exception& e) {  // this stream's text waits for its next response
        LogIfError(CaughtError("flush", e.what()), __LINE__, "flush");
      }
      s->Unref();
      q.lock();
    }
  } catch (...) {
    LogIfError(CaughtError("flusher", "stopped by an exception; held text now waits for each stream's next response"),
               __LINE__, "flusher");
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

// The strings of a BYTES tensor (each a 4-byte little-endian length, then the bytes);
// false when the tensor is not whole elements.
bool Strings(const std::string& data, std::vector<std::string>& out) {
  size_t at = 0;
  while (at + 4 <= data.size()) {
    uint32_t len;
    std::memcpy(&len, data.data() + at, 4);
    at += 4;
    if (len > data.size() - at) return false;
    out.emplace_back(data, at, len);
    at += len;
  }
  return at == data.size();
}

// The text inputs a direct caller may send wrong: whole elements of valid UTF-8 (the
// tokenizer model refuses anything else before it reaches here; empty strings are padding).
TRITONSERVER_Error* ReadTexts(const std::string& field, const std::string& data, std::vector<std::string>& out) {
  if (!Strings(data, out)) return InvalidArgument(field, "must be whole BYTES elements (a uint32 length, then the bytes)");
  for (const std::string& text : out) {
    if (!IsValidUtf8(text)) return InvalidArgument(field, "must be valid UTF-8");
  }
  return nullptr;
}

// What the tokenizer model checks before the engine sees a request, checked again for a
// client that calls this model directly: one request (batch 1), a prompt of 1 to
// max_input_len valid token ids, and 1 to max_seq_len - prompt new tokens.
TRITONSERVER_Error* CheckRequest(const Stream* s, int64_t batch, int64_t prompt_ids, bool ids_in_vocabulary,
                                 const ModelState* m) {
  if (batch != 1) return InvalidArgument("batch", "must be 1 (one request per call), got " + std::to_string(batch));
  if (!ids_in_vocabulary)
    return InvalidArgument("INPUT_IDS", "must be token ids in 0.." + std::to_string(m->tables[0].size() - 1));
  if (s->input_length < 1 || s->input_length != prompt_ids)
    return InvalidArgument("INPUT_LENGTHS", "must be the number of INPUT_IDS (" + std::to_string(prompt_ids) +
                                                "), got " + std::to_string(s->input_length));
  if (m->max_input_len > 0 && s->input_length > m->max_input_len)
    return InvalidArgument("INPUT_IDS", "must be at most " + std::to_string(m->max_input_len) +
                                            " tokens (the engine's max_input_len), got " + std::to_string(s->input_length));
  const int64_t room = m->max_seq_len > 0 ? m->max_seq_len - s->input_length : INT32_MAX;
  if (s->max_tokens < 1 || s->max_tokens > room)
    return InvalidArgument("REQUEST_OUTPUT_LEN", "must be in 1.." + std::to_string(room) +
                                                     " (the engine's max_seq_len " + std::to_string(m->max_seq_len) +
                                                     " minus the prompt's " + std::to_string(s->input_length) +
                                                     " tokens), got " + std::to_string(s->max_tokens));
  return nullptr;
}

// Reads one client request: the engine's inputs (upper-cased in the model config) are
// copied for the engine, the detokenizer's own are read, and what it reads is checked.
TRITONSERVER_Error* ReadRequest(TRITONBACKEND_Request* request, Stream* s, bool* stop) {
  const char* id = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_RequestId(request, &id));
  s->client_id = id ? id : "";
  uint32_t count = 0;
  RETURN_IF_ERR(TRITONBACKEND_RequestInputCount(request, &count));
  bool skip_special = true;
  int64_t batch = 1, prompt_ids = 0;
  std::string ids;
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
    if (dims > 0 && shape[0] != 1) batch = shape[0];
    std::string data;
    RETURN_IF_ERR(ReadInput(in, bytes, buffers, data));
    const std::string field(name);
    std::vector<std::string> texts;
    if (field == "STOP") {
      *stop = FirstFlag(data);
    } else if (field == "STREAMING") {
      s->streaming = data.empty() || FirstFlag(data);
    } else if (field == "STOP_STRINGS") {
      RETURN_IF_ERR(ReadTexts(field, data, texts));
      for (std::string& stop_string : texts) s->stop_strings.push_back(std::move(stop_string));
    } else if (field == "ECHO_TEXT") {
      RETURN_IF_ERR(ReadTexts(field, data, texts));
      for (const std::string& text : texts) s->echo += text;
    } else if (field == "INCLUDE_STOP_STR_IN_OUTPUT") {
      s->include_stop = FirstFlag(data);
    } else if (field == "RETURN_NUM_INPUT_TOKENS" || field == "RETURN_NUM_OUTPUT_TOKENS") {
      continue;  // accepted as upstream's ensemble has them; every response carries both counts
    } else if (field == "SKIP_SPECIAL_TOKENS") {
      skip_special = data.empty() || FirstFlag(data);
    } else if ((field == "STOP_WORDS_LIST" || field == "BAD_WORDS_LIST") && OnlyPadding(data, shape, dims)) {
      continue;
    } else {
      if (field == "INPUT_IDS") {
        ids = data;
        prompt_ids = static_cast<int64_t>(data.size() / 4);
      }
      if (field == "INPUT_LENGTHS") s->input_length = FirstInt32(data);
      if (field == "REQUEST_OUTPUT_LEN") s->max_tokens = FirstInt32(data);
      // read here, and sent on to the engine too
      if (field == "NUM_RETURN_SEQUENCES" && !data.empty()) s->sequences = FirstInt32(data);
      if (field == "RETURN_LOG_PROBS") s->log_probs = FirstFlag(data);
      s->engine_inputs.push_back({Lower(field), datatype, std::vector<int64_t>(shape, shape + dims), std::move(data)});
    }
  }
  s->table = &s->model->tables[skip_special ? 0 : 1];
  if (*stop) return nullptr;
  if (s->sequences < 1 || s->sequences > kMaxSequences)
    return InvalidArgument("NUM_RETURN_SEQUENCES", "must be in 1.." + std::to_string(kMaxSequences) + ", got " +
                                                       std::to_string(s->sequences));
  s->seqs.resize(static_cast<size_t>(s->sequences));
  for (Stream::Sequence& q : s->seqs) {
    q.text.include_stop = s->include_stop;
    for (const std::string& stop_string : s->stop_strings) q.text.stops.Add(stop_string);
  }  // a `stop` names a request id; its other inputs are not used
  bool in_vocabulary = true;
  for (size_t k = 0; k + 4 <= ids.size() && in_vocabulary; k += 4) {
    int32_t token;
    std::memcpy(&token, ids.data() + k, 4);
    in_vocabulary = token >= 0 && static_cast<size_t>(token) < s->model->tables[0].size();
  }
  return CheckRequest(s, batch, prompt_ids, in_vocabulary, s->model);
}

// Builds the engine request and hands it to the server. The stream is registered under its
// client id first (before the engine can answer, so that its final finds it); on an error
// the caller unregisters it (StartFailed).
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
  if (s->sequences > 1) RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddRequestedOutput(req, "sequence_index"));
  if (s->log_probs) RETURN_IF_ERR(TRITONSERVER_InferenceRequestAddRequestedOutput(req, "output_log_probs"));
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestSetReleaseCallback(req, EngineRequestReleased, s));
  RETURN_IF_ERR(TRITONSERVER_InferenceRequestSetResponseCallback(req, m->allocator, nullptr, EngineResponse, s));
  if (!s->client_id.empty()) {
    std::lock_guard<std::mutex> lock(m->runs_mu);
    m->runs.emplace(s->client_id, s);
  }
  return TRITONSERVER_ServerInferAsync(m->server, req, nullptr);
}

// Drops the three references of a stream the engine never took (the engine's two, never
// to be released by it, and execute's): it goes now, or when a `stop` holding it lets go.
void DropUnstarted(Stream* s) noexcept {
  for (int held = 0; held < 3; ++held) s->Unref();
}

// A stream the engine never took: the client gets `error` (unless it has had its final,
// from a concurrent `stop`), and the stream goes when a `stop` holding it lets it go.
void StartFailed(Stream* s, TRITONSERVER_Error* error) noexcept {
  try {
    std::lock_guard<std::mutex> lock(s->mu);
    s->engine_done = true;  // no engine response will come
    if (!s->done && s->factory != nullptr) {
      s->done = true;
      SendError(s->factory, TRITONSERVER_ErrorMessage(error), TRITONSERVER_ErrorCode(error));
    }
  } catch (...) {
    Log(TRITONSERVER_LOG_ERROR, __LINE__, "detokenizer: a stream that did not start could not be answered");
  }
  Unregister(s);
  DropUnstarted(s);
}

// Takes one client request: a `stop` is carried out, a request the server already marked
// cancelled ends at once, anything else starts its engine request. On success `s` is set to
// null (handed to the engine or finished); on an error or exception the caller still owns it.
TRITONSERVER_Error* Start(ModelState* m, TRITONBACKEND_Request* request, Stream*& s) {
  bool stop = false;
  RETURN_IF_ERR(ReadRequest(request, s, &stop));
  if (stop) {  // end its client id's streams, then answer it
    CancelRuns(m, s->client_id);
    s->done = s->engine_done = true;
    LogIfError(TRITONBACKEND_ResponseFactorySendFlags(s->factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL), __LINE__,
               "send flags");
    DropUnstarted(s);
    s = nullptr;
    return nullptr;
  }
  HoldUntilCancelled(s, request);
  bool cancelled = false;  // e.g. by the ensemble, for a client that went away while it queued
  RETURN_IF_ERR(TRITONBACKEND_RequestIsCancelled(request, &cancelled));
  Fault(s->client_id, "execute");
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (cancelled) {
      EndAll(s, "cancelled");  // no engine work for it
      s->engine_done = true;
    } else if (!s->echo.empty()) {  // the prompt first, for each sequence: its own response, or the text's start
      for (size_t k = 0; k < s->seqs.size(); ++k) {
        if (s->streaming) SendText(s, k, s->echo, "", false);
        else s->seqs[k].held = s->echo;
      }
    }
  }
  if (cancelled) {
    DropUnstarted(s);
    s = nullptr;
    return nullptr;
  }
  RETURN_IF_ERR(StartEngine(m, s));
  Stream* started = s;
  s = nullptr;  // the engine's callbacks hold it now; execute keeps its own reference below
  {
    std::lock_guard<std::mutex> lock(started->mu);
    started->in_engine = true;
    if (started->done) CancelEngine(started);  // ended (a `stop`, a stop string) before the server took it
  }
  started->Unref();
  return nullptr;
}

// Reads a token table: uint32 count, then per id uint32 length + bytes (little-endian).
TRITONSERVER_Error* ReadTable(const std::string& path, std::vector<std::string>& table) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_NOT_FOUND, ("detokenizer: cannot read " + path).c_str());
  const uint64_t file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  uint32_t count = 0;
  // each id takes at least its 4-byte length: a count the file cannot hold is a broken table
  if (!f.read(reinterpret_cast<char*>(&count), 4) || 4 + 4 * static_cast<uint64_t>(count) > file_size)
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG,
                                 ("detokenizer: " + path + " is not a token table (its count exceeds its size)").c_str());
  table.resize(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t len = 0;
    if (!f.read(reinterpret_cast<char*>(&len), 4) || len > file_size)
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
  std::string j;
  if (e == nullptr) j.assign(json, size);
  TRITONSERVER_MessageDelete(config);
  if (e != nullptr) return e;
  const std::string interval = Parameter(j, "min_response_interval_us");
  if (!interval.empty()) m->min_interval = std::chrono::microseconds(std::atol(interval.c_str()));
  const std::string engine = Parameter(j, "engine_model");
  if (!engine.empty()) m->engine = engine;
  m->max_input_len = std::atol(Parameter(j, "max_input_len").c_str());
  m->max_seq_len = std::atol(Parameter(j, "max_seq_len").c_str());
  return nullptr;
}

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Reports a request's statistics (what Triton's statistics and perf_analyzer read: the
// time to read it and hand it to the engine) and releases it.
void Finish(TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, bool success,
            uint64_t start) noexcept {
  const uint64_t end = NowNs();
  LogIfError(TRITONBACKEND_ModelInstanceReportStatistics(instance, request, success, start, start, end, end),
             __LINE__, "statistics");
  LogIfError(TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL), __LINE__, "release");
}

// A request that has no response factory (making one failed) is answered with the request.
void AnswerWithoutFactory(TRITONBACKEND_Request* request, TRITONSERVER_Error* error) noexcept {
  TRITONBACKEND_Response* r = nullptr;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNew(&r, request);
  if (e != nullptr) {
    LogIfError(e, __LINE__, "a request that cannot be answered");
    return;
  }
  LogIfError(TRITONBACKEND_ResponseSend(r, TRITONSERVER_RESPONSE_COMPLETE_FINAL, error), __LINE__, "send");
}

// One client request, start to release: answered (by its stream, or with an error) and
// released exactly once, whatever is thrown.
void Execute(TRITONBACKEND_ModelInstance* instance, ModelState* m, TRITONBACKEND_Request* request) noexcept {
  const uint64_t start = NowNs();
  TRITONBACKEND_ResponseFactory* factory = nullptr;
  Stream* s = nullptr;
  TRITONSERVER_Error* e = Guarded("execute", [&]() -> TRITONSERVER_Error* {
    RETURN_IF_ERR(TRITONBACKEND_ResponseFactoryNew(&factory, request));
    s = new Stream();
    s->model = m;
    s->factory = factory;  // the stream deletes it
    factory = nullptr;
    return Start(m, request, s);
  });
  const bool ok = e == nullptr;
  if (!ok) {
    if (s != nullptr) {
      StartFailed(s, e);
    } else if (factory != nullptr) {
      SendError(factory, TRITONSERVER_ErrorMessage(e), TRITONSERVER_ErrorCode(e));
      LogIfError(TRITONBACKEND_ResponseFactoryDelete(factory), __LINE__, "delete factory");
    } else {
      AnswerWithoutFactory(request, e);
    }
    TRITONSERVER_ErrorDelete(e);
  }
  Finish(instance, request, ok, start);  // the inputs are copied: the client request can go
}

// Stops the flusher and frees the model's state.
void DeleteModelState(ModelState* m) {
  if (m->flusher.joinable()) {
    {
      std::lock_guard<std::mutex> q(m->qmu);
      m->stopping = true;
    }
    m->qcv.notify_all();
    m->flusher.join();
  }
  if (m->allocator) LogIfError(TRITONSERVER_ResponseAllocatorDelete(m->allocator), __LINE__, "allocator");
  delete m;
}

}  // namespace

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend*) {
  return Guarded("initialize", []() -> TRITONSERVER_Error* {
    uint32_t major = 0, minor = 0;
    RETURN_IF_ERR(TRITONBACKEND_ApiVersion(&major, &minor));
    const std::string version = std::to_string(major) + "." + std::to_string(minor);
    if (major != DETOKENIZER_BACKEND_API_MAJOR || minor < DETOKENIZER_BACKEND_API_MINOR)
      return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_UNSUPPORTED,
                                   ("detokenizer: backend API " + version + " is not compatible with 1.19").c_str());
    Log(TRITONSERVER_LOG_INFO, __LINE__, "detokenizer: backend API " + version);
    return nullptr;
  });
}

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  ModelState* m = nullptr;
  TRITONSERVER_Error* e = Guarded("model initialize", [&]() -> TRITONSERVER_Error* {
    m = new ModelState();
    RETURN_IF_ERR(TRITONBACKEND_ModelServer(model, &m->server));
    TRITONBACKEND_ArtifactType type;
    const char* location = nullptr;
    RETURN_IF_ERR(TRITONBACKEND_ModelRepository(model, &type, &location));
    RETURN_IF_ERR(ReadTable(std::string(location) + "/token_table.bin", m->tables[0]));
    RETURN_IF_ERR(ReadTable(std::string(location) + "/token_table_special.bin", m->tables[1]));
    if (m->tables[0].empty() || m->tables[0].size() != m->tables[1].size())
      return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG,
                                   "detokenizer: the two token tables must hold the same, non-zero number of ids");
    RETURN_IF_ERR(ReadConfig(model, m));
    RETURN_IF_ERR(TRITONSERVER_ResponseAllocatorNew(&m->allocator, Alloc, Release, nullptr));
    if (m->min_interval.count() > 0) m->flusher = std::thread(FlushLoop, m);
    Log(TRITONSERVER_LOG_INFO, __LINE__, "detokenizer: token table of " + std::to_string(m->tables[0].size()) +
        " ids, engine " + m->engine + ", min response interval " +
        std::to_string(std::chrono::duration_cast<std::chrono::microseconds>(m->min_interval).count()) + " us");
    return TRITONBACKEND_ModelSetState(model, m);
  });
  if (e != nullptr && m != nullptr) DeleteModelState(m);
  return e;
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  return Guarded("model finalize", [&]() -> TRITONSERVER_Error* {
    void* state = nullptr;
    RETURN_IF_ERR(TRITONBACKEND_ModelState(model, &state));
    if (state != nullptr) DeleteModelState(static_cast<ModelState*>(state));
    return nullptr;
  });
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance*) { return nullptr; }
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance*) { return nullptr; }

// An error returned here makes Triton answer and release every request itself, so one is
// returned only before any request is touched; after that each is answered and released by
// Execute, whatever happens.
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests, const uint32_t request_count) {
  TRITONBACKEND_Model* model;
  RETURN_IF_ERR(TRITONBACKEND_ModelInstanceModel(instance, &model));
  void* state = nullptr;
  RETURN_IF_ERR(TRITONBACKEND_ModelState(model, &state));
  auto* m = static_cast<ModelState*>(state);
  const uint64_t exec_start = NowNs();
  for (uint32_t r = 0; r < request_count; ++r) Execute(instance, m, requests[r]);
  const uint64_t exec_end = NowNs();
  LogIfError(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, request_count, exec_start, exec_start,
                                                               exec_end, exec_end),
             __LINE__, "batch statistics");
  return nullptr;
}

}  // extern "C"
