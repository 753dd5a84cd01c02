"""Guided decoding with xgrammar, as TensorRT-LLM 1.2.1's executor does it on GPUs
(cpp/tensorrt_llm/batch_manager/guidedDecoder.cpp): a guide is compiled against the
tokenizer's vocabulary (json: xgrammar's built-in JSON grammar; json_schema: the schema;
regex and ebnf_grammar: a grammar from them), and a matcher per sequence masks the logits
of every step to the tokens the grammar allows, then accepts the chosen one. Once the
grammar is complete it allows only the end token, so the sequence ends there.

Used by the tokenizer model (a guide that does not compile is refused before any engine
work), the CPU reference engine (the mask, for real), and the GPU fill (the tokenizer info
file the tensorrtllm backend reads, `xgrammar_tokenizer_info_path`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mixtral_triton.protocol.guided import GUIDE_FIELD, Guide
from mixtral_triton.protocol.predict import RequestError

# xgrammar's errors start with a timestamp and its source file: "[20:41:43] /project/cpp/x.cc:75: "
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(err\.empty\(\)\) is false: )?")


# xgrammar (and the torch it brings) is imported where it is used: a tokenizer model or
# gateway that never meets a guide does not load it (the image-compatibility venv has neither).
class GrammarCompiler:
    """Compiles guides for one tokenizer (compiled grammars are cached by xgrammar)."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        # vocab_size: the model's (the logits' width), which may exceed the tokenizer's.
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info)

    @classmethod
    def from_folder(cls, tokenizer_dir: str | Path, vocab_size: int | None = None) -> "GrammarCompiler":
        tokenizer = _load_tokenizer(tokenizer_dir)
        return cls(tokenizer, vocab_size or len(tokenizer))

    def compile(self, guide: Guide) -> xgrammar.CompiledGrammar:
        """The guide compiled; RequestError naming guided_decoding_guide if it does not compile."""
        import xgrammar

        try:
            if guide.type == "json":
                return self._compiler.compile_builtin_json_grammar()
            if guide.type == "json_schema":
                # Compact JSON (no free whitespace between tokens), which a random-weight
                # model needs to end within max_tokens: with whitespace allowed it fills the
                # gaps with it. TensorRT-LLM's guidedDecoder.cpp (the index's copy, not
                # pinned to 1.2.1) passes xgrammar's default (any whitespace); both
                # produce JSON that validates, only its spacing may differ on GPUs.
                return self._compiler.compile_json_schema(guide.text, any_whitespace=False)
            if guide.type == "regex":
                return self._compiler.compile_grammar(xgrammar.Grammar.from_regex(guide.text))
            return self._compiler.compile_grammar(xgrammar.Grammar.from_ebnf(guide.text))
        except (RuntimeError, ValueError) as exc:
            reason = _XGRAMMAR_PREFIX.sub("", str(exc).strip()).splitlines()[0][:300]
            raise RequestError(GUIDE_FIELD, f"{GUIDE_FIELD} does not compile as {guide.type}: "
                               f"{reason}") from None


class GrammarMask:
    """One sequence's matcher: the tokens its grammar allows next, and the tokens it took."""

    def __init__(self, grammar: xgrammar.CompiledGrammar, vocab_size: int):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 [vocab] logits with every token the grammar forbids at -inf (in place)."""
        import xgrammar

        self._matcher.fill_next_token_bitmask(self._bitmask)
        xgrammar.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask)
        return logits

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and took its end token."""
        return self._matcher.is_terminated()


# The file the tensorrtllm backend reads at `xgrammar_tokenizer_info_path` (TensorRT-LLM
# 1.2.1 model_instance_state.cc, getGuidedDecodingConfigFromParams: the keys below), as
# upstream's examples/generate_xgrammar_tokenizer_info.py writes it
# (tensorrt_llm/llmapi/tokenizer.py _xgrammar_tokenizer_info for a fast tokenizer): the
# vocabulary's tokens in id order, the Hugging Face tokenizer.json text (xgrammar detects
# the vocabulary type and prefix space from it), and the end token as the stop token.
TOKENIZER_INFO_FILE = "xgrammar_tokenizer_info.json"


def tokenizer_info(tokenizer_dir: str | Path) -> dict:
    tokenizer = _load_tokenizer(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    return {"encoded_vocab": sorted(vocab, key=vocab.__getitem__),
            "tokenizer_str": tokenizer.backend_tokenizer.to_str(),
            "stop_token_ids": [tokenizer.eos_token_id]}


def write_tokenizer_info(tokenizer_dir: str | Path, path: Path) -> Path:
    path.write_text(json.dumps(tokenizer_info(tokenizer_dir)), encoding="utf-8")
    return path


def _load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    # Local files only, never remote code: the folder is a checkpoint we converted.
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
