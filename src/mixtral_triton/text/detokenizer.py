"""Incremental detokenization for SentencePiece (Llama/Mistral) vocabularies.

The tokenizer is turned once into a table id -> bytes; a stream then costs one table
lookup per token plus an incremental UTF-8 decode of those bytes, never a re-decode of
the text so far.

Compared with `tokenizer.decode(ids, skip_special_tokens=True)` of the same completion:
- the leading space is kept: '▁Paris' gives ' Paris'. Hugging Face's decoder strips the
  first space of whatever it decodes, which is right for a prompt but drops the space
  between a prompt and its completion;
- invalid UTF-8 (possible only through byte-fallback tokens) becomes U+FFFD exactly as
  `bytes.decode("utf-8", "replace")` does for the whole completion, as soon as the bytes
  are certainly invalid; a character still incomplete at the end becomes U+FFFD at
  finish(). Hugging Face instead replaces every byte of a run of byte tokens that is
  not valid as a whole;
- otherwise the text is identical. Valid text never yields U+FFFD: a character split
  over byte tokens is held back until its last byte arrives.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_table(tokenizer, skip_special_tokens: bool = True) -> tuple[bytes, ...]:
    """id -> the bytes the token stands for, from a Hugging Face tokenizer.

    '▁' is a space, byte-fallback '<0xNN>' is the byte NN, and special tokens (those the
    tokenizer flags special, as skip_special_tokens drops them) are empty, or their own
    text (`</s>`) with skip_special_tokens false.
    """
    silent = set(tokenizer.all_special_ids)
    silent.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    if not skip_special_tokens:
        silent = set()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(b"" if i in silent else _piece_bytes(piece) for i, piece in enumerate(pieces))


def load_token_table(tokenizer_dir: str | Path, skip_special_tokens: bool = True) -> tuple[bytes, ...]:
    """`token_table` of the tokenizer in a folder, read with the `tokenizers` library when
    the folder has a tokenizer.json: the same table, without importing transformers (and
    torch with it, ~300 MB and seconds per process; the detokenizer runs several)."""
    folder = Path(tokenizer_dir)
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return token_table(AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                         trust_remote_code=False), skip_special_tokens)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    silent = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    silent.update(i for i in map(tokenizer.token_to_id, _special_token_names(folder)) if i is not None)
    if not skip_special_tokens:
        silent = set()
    pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
    return tuple(b"" if i in silent or piece is None else _piece_bytes(piece)
                 for i, piece in enumerate(pieces))


def _special_token_names(folder: Path) -> set[str]:
    """The tokens transformers counts special (bos, eos, unk, pad and the additional ones),
    as the folder's tokenizer_config.json and special_tokens_map.json name them."""
    names: set[str] = set()
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / file
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        values = [config.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token",
                                              "sep_token", "cls_token", "mask_token")]
        values += config.get("additional_special_tokens") or []
        for value in values:
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                names.add(value)
    return names


def _piece_bytes(piece: str) -> bytes:
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class Detokenizer:
    """Token ids in, text out; every piece of text returned is complete characters."""

    def __init__(self, table: Sequence[bytes]):
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Iterable[int]) -> str:
        return self._utf8.decode(b"".join(self._bytes(i) for i in token_ids))

    def finish(self) -> str:
        """The end of the stream: an incomplete character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)

    @property
    def held_bytes(self) -> int:
        """Bytes of an incomplete character waiting for the rest (at most 3)."""
        return len(self._utf8.getstate()[0])

    def _bytes(self, token_id: int) -> bytes:
        # A negative id would silently index from the end of the table.
        if not 0 <= token_id < len(self._table):
            raise ValueError(f"token id {token_id} is outside the vocabulary 0..{len(self._table) - 1}")
        return self._table[token_id]
