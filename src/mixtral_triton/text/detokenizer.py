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
import re
from typing import Iterable, Sequence

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_table(tokenizer) -> tuple[bytes, ...]:
    """id -> the bytes the token stands for, from a Hugging Face tokenizer.

    '▁' is a space, byte-fallback '<0xNN>' is the byte NN, and special tokens (those the
    tokenizer flags special, as skip_special_tokens drops them) are empty.
    """
    silent = set(tokenizer.all_special_ids)
    silent.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(b"" if i in silent else _piece_bytes(piece) for i, piece in enumerate(pieces))


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
