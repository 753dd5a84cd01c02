"""Streaming detokenization, stop strings and TensorRT-LLM word lists on the real Mistral tokenizers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mixtral_triton.text import (Detokenizer, StopMatcher, TextStream, load_token_table, token_table,
                                 word_token_ids, words_list)

FFFD = "\ufffd"
BYTE0 = 3  # id of '<0x00>' in the v1 vocabulary; byte b is BYTE0 + b
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def table(tokenizer):
    return token_table(tokenizer)


def stream(make, chunks):
    """Push the chunks into a fresh stream object; return every output, finish() included."""
    obj = make()
    return [obj.push(chunk) for chunk in chunks] + [obj.finish()]


def split(items, cuts):
    """items cut at the given positions (a random chunking)."""
    bounds = sorted({c % (len(items) + 1) for c in cuts} | {0, len(items)})
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def encode_plain(tokenizer, text):
    """Text as the model could generate it: '</s>' in it is text, not the special token."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def hf_with_first_space(hf: str, ours: str) -> bool:
    """Hugging Face's decode is ours with the first space stripped (its decoder's Strip step)."""
    return hf == (ours[1:] if ours.startswith(" ") else ours)


# --- the table ---

@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_instruct_checkpoint"])
def test_every_token_of_the_vocabulary_decodes_as_hugging_face_does(checkpoint, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(checkpoint))
    table = token_table(tok)
    assert len(table) == len(tok)
    # After a glued 'x' Hugging Face's first-space strip cannot touch the token itself.
    x = tok.convert_tokens_to_ids("x")
    decoded = tok.batch_decode([[x, i] for i in range(len(tok))], skip_special_tokens=True)
    assert [piece.decode("utf-8", "replace") for piece in table] == [text[1:] for text in decoded]


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_instruct_checkpoint"])
def test_the_table_read_without_transformers_is_the_same(checkpoint, request, tmp_path):
    folder = request.getfixturevalue(checkpoint)
    expected = token_table(AutoTokenizer.from_pretrained(folder))
    assert (folder / "tokenizer.json").is_file()
    assert load_token_table(folder) == expected
    # A folder with only the SentencePiece model is read through transformers instead.
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    assert load_token_table(tmp_path) == expected


def test_special_tokens_are_empty_and_pieces_map_to_bytes(tokenizer, table):
    assert table[tokenizer.unk_token_id] == table[tokenizer.bos_token_id] == table[tokenizer.eos_token_id] == b""
    assert table[tokenizer.convert_tokens_to_ids("▁Paris")] == b" Paris"
    assert table[tokenizer.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert table[BYTE0 + 0xE6] == b"\xe6"


def test_instruct_control_tokens_are_empty(tiny_instruct_checkpoint):
    # The v3 tokenizer flags its control tokens ([INST], [TOOL_CALLS], ...) special, as the
    # hub's Instruct checkpoint does; the table follows the flags, as decode() does.
    tok = AutoTokenizer.from_pretrained(tiny_instruct_checkpoint)
    table = token_table(tok)
    controls = tok.convert_tokens_to_ids(["[INST]", "[/INST]", "[TOOL_CALLS]"])
    assert [table[i] for i in controls] == [b"", b"", b""]
    assert tok.decode(controls, skip_special_tokens=True) == ""
    assert table[tok.eos_token_id] == b""


# --- the detokenizer ---

def test_a_completion_keeps_its_leading_space(tokenizer, table):
    ids = tokenizer.encode(" Paris is", add_special_tokens=False)[1:]  # as generated after a prompt
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁Paris", "▁is"]
    assert "".join(stream(lambda: Detokenizer(table), [[i] for i in ids])) == " Paris is"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Paris is"


def test_a_character_split_over_byte_tokens_is_held_until_complete(tokenizer, table):
    ids = tokenizer.encode("🦙!", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[1:5] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    detokenizer = Detokenizer(table)
    outputs = []
    for i in ids:
        outputs.append(detokenizer.push([i]))
        assert detokenizer.held_bytes <= 3
    assert outputs == [" ", "", "", "", "🦙", "!"]
    assert detokenizer.finish() == ""


def test_invalid_bytes_become_one_replacement_character(table):
    # An incomplete character at the end: held, then U+FFFD at finish only.
    assert stream(lambda: Detokenizer(table), [[BYTE0 + 0xE6], [BYTE0 + 0x97]]) == ["", "", FFFD]
    # A byte that can never start a character: replaced at once, the text goes on.
    assert stream(lambda: Detokenizer(table), [[BYTE0 + 0x80], [BYTE0 + 0x41]]) == [FFFD, "A", ""]


def test_where_hugging_face_decode_differs_on_invalid_bytes(tokenizer, table):
    # Hugging Face replaces every byte of an invalid run of byte tokens, valid ones too;
    # we follow bytes.decode(errors="replace"): one U+FFFD per invalid sequence.
    ids = [BYTE0 + 0x41, BYTE0 + 0xE6, tokenizer.convert_tokens_to_ids("▁Paris")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == FFFD * 2 + " Paris"
    assert "".join(stream(lambda: Detokenizer(table), [ids])) == "A" + FFFD + " Paris"


@pytest.mark.parametrize("bad", [-1, 32000, 10**9])
def test_ids_outside_the_vocabulary_are_rejected(table, bad):
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary 0..31999"):
        Detokenizer(table).push([5, bad])


class CountingTable(Sequence):
    def __init__(self, table):
        self.table, self.lookups = table, 0

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        self.lookups += 1
        return self.table[i]


def test_each_token_costs_one_lookup_however_long_the_stream(tokenizer, table):
    text = "Ünïcödé 日本語 🦙🦙 code:\n\tx  =  1\n" * 60
    ids = encode_plain(tokenizer, text)
    counting = CountingTable(table)
    detokenizer, matcher = Detokenizer(counting), StopMatcher(["never appears in it", "🦙🦙🦙"])
    lookups, held = [], []
    for i in ids:
        before = counting.lookups
        matcher.push(detokenizer.push([i]))
        lookups.append(counting.lookups - before)
        held.append((detokenizer.held_bytes, len(matcher.held)))
    assert len(ids) > 1500
    assert set(lookups) == {1}  # no re-decoding of earlier tokens, ever
    # The only state that could grow with the stream is what is held back; it stays bounded,
    # so each push works on its own token plus a bounded tail.
    assert max(b for b, _ in held) <= 3
    assert max(c for _, c in held) <= len("never appears in it") - 1


# Random token sequences, biased to byte tokens so that split and invalid characters are common.
_FFFD_PIECE = 29137  # the v1 vocabulary has a literal '�' piece; it would blur the U+FFFD checks
_ids = st.lists(st.integers(BYTE0 + 0x80, BYTE0 + 0xFF) | st.integers(0, 31999).filter(lambda i: i != _FFFD_PIECE),
                max_size=40)


@SETTINGS
@given(ids=_ids, cuts=st.lists(st.integers(0, 100), max_size=10))
def test_random_ids_stream_exactly_as_one_decode(tokenizer, table, ids, cuts):
    chunks = stream(lambda: Detokenizer(table), split(ids, cuts))
    whole = b"".join(table[i] for i in ids)
    assert "".join(chunks) == whole.decode("utf-8", "replace")
    for chunk in chunks:
        chunk.encode("utf-8")  # complete characters only: no lone surrogate halves
    hf = tokenizer.decode(ids, skip_special_tokens=True)
    try:
        whole.decode("utf-8")
    except UnicodeDecodeError:
        assert FFFD in "".join(chunks) and FFFD in hf
    else:
        assert not any(FFFD in chunk for chunk in chunks)
        assert hf_with_first_space(hf, "".join(chunks))


# Any text but U+2581 ('▁'): SentencePiece reads it as its own space marker, so a literal
# one comes back as a space whatever the detokenizer does.
_texts = st.text(
    st.sampled_from("aeéèçñüßÅøœ日本語中文字한국어😀🦙👍🏽 \t\n{}();=_#\"'") | st.characters(
        codec="utf-8", exclude_categories=["Cs", "Co", "Cn"], exclude_characters=FFFD + "\u2581"),
    max_size=60)


@SETTINGS
@given(text=_texts, cuts=st.lists(st.integers(0, 100), max_size=10))
def test_any_prompt_text_streams_back_exactly(tokenizer, table, text, cuts):
    ids = encode_plain(tokenizer, text)
    chunks = stream(lambda: Detokenizer(table), split(ids, cuts))
    # SentencePiece puts '▁' before the text; a completion keeps that space.
    assert "".join(chunks) == (" " + text if text else "")
    assert not any(FFFD in chunk for chunk in chunks)
    assert hf_with_first_space(tokenizer.decode(ids, skip_special_tokens=True), "".join(chunks))


def test_code_with_runs_of_spaces_tabs_and_newlines(tokenizer, table):
    code = "def f(x):\n\tif x:\n        return  x\t# done\n\n\n    \n"
    ids = tokenizer.encode(code, add_special_tokens=False)
    assert "".join(stream(lambda: Detokenizer(table), [[i] for i in ids])) == " " + code


# --- stop strings ---

def reference_cut(text: str, stops) -> tuple[str, bool]:
    """Non-streamed: cut before the stop that ends first (the longer one on a tie)."""
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return (text[:min(found)[1]], True) if found else (text, False)


def test_a_stop_split_over_chunks_is_never_emitted():
    matcher = StopMatcher(["world"])
    assert [matcher.push("Hel"), matcher.push("lo wor")] == ["Hel", "lo "]
    assert matcher.held == "wor"
    assert matcher.push("ld and more") == ""
    assert matcher.stopped and matcher.push("more") == "" and matcher.finish() == ""


def test_a_partial_match_is_released_once_it_cannot_be_a_stop():
    matcher = StopMatcher(["abc"])
    assert matcher.push("xab") == "x"
    assert matcher.push("d") == "abd"
    assert matcher.push("ab") == ""
    assert matcher.finish() == "ab"
    assert not matcher.stopped


def test_the_stop_that_completes_first_wins():
    assert stream(lambda: StopMatcher(["abcd", "c"]), ["abcd"]) == ["ab", ""]
    assert stream(lambda: StopMatcher(["abcd", "c"]), ["ab", "c", "d"]) == ["", "ab", "", ""]
    assert stream(lambda: StopMatcher(["bc", "abc"]), ["xabc"]) == ["x", ""]


def test_no_stops_pass_everything_through():
    matcher = StopMatcher([])
    assert [matcher.push("a"), matcher.held, matcher.finish()] == ["a", "", ""]


@SETTINGS
@given(text=st.text("ab\n ", max_size=40), stops=st.lists(st.text("ab\n ", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 100), max_size=10))
def test_streamed_stops_cut_like_the_whole_text(text, stops, cuts):
    matcher = StopMatcher(stops)
    outputs = []
    for chunk in split(text, cuts):
        outputs.append(matcher.push(chunk))
        assert len(matcher.held) <= max(map(len, stops), default=1) - 1
    outputs.append(matcher.finish())
    expected, stopped = reference_cut(text, stops)
    assert ("".join(outputs), matcher.stopped) == (expected, stopped)
    assert not any(s in "".join(outputs) for s in stops)


@SETTINGS
@given(text=_texts, data=st.data())
def test_text_stream_of_tokens_with_stops(tokenizer, table, text, data):
    ids = encode_plain(tokenizer, text)
    full = " " + text if text else ""
    # Stops taken from the text itself (so they fire) and maybe one that never occurs.
    stops = data.draw(st.lists(st.builds(lambda a, n: full[a:a + n], st.integers(0, 60), st.integers(1, 4))
                               .filter(bool) | st.just("\x00never"), max_size=3))
    chunks = stream(lambda: TextStream(table, stop=stops), split(ids, data.draw(st.lists(st.integers(0, 100)))))
    expected, _ = reference_cut(full, stops)
    assert "".join(chunks) == expected
    assert not any(FFFD in chunk for chunk in chunks)


def test_text_stream_stops_and_reports_it(tokenizer, table):
    ids = tokenizer.encode("The answer is 42.\nUser: next", add_special_tokens=False)
    ts = TextStream(table, stop=["\nUser:"])
    text = "".join(ts.push([i]) for i in ids)
    assert ts.stopped and text == " The answer is 42."
    assert ts.push([5]) == "" and ts.finish() == ""


def test_a_stop_completed_by_the_final_flush(table):
    ts = TextStream(table, stop=["x" + FFFD])
    assert ts.push([BYTE0 + ord("x"), BYTE0 + 0xE6]) == ""
    assert ts.finish() == "" and ts.stopped


# --- stop and bad word lists for TensorRT-LLM ---

def test_words_list_format(tokenizer):
    paris_glued = tokenizer.convert_tokens_to_ids(["Par", "is"])
    paris = tokenizer.convert_tokens_to_ids("▁Paris")
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    array = words_list(tokenizer, ["Paris", "\n"])
    assert array.dtype == np.int32
    assert array.tolist() == [[*paris_glued, paris, newline], [2, 3, 4, -1]]


def test_no_words_give_an_empty_list(tokenizer):
    array = words_list(tokenizer, [])
    assert array.shape == (2, 0) and array.dtype == np.int32


def test_a_word_with_a_leading_space_has_only_its_spaced_form(tokenizer):
    assert word_token_ids(tokenizer, " Paris") == [[tokenizer.convert_tokens_to_ids("▁Paris")]]
    assert word_token_ids(tokenizer, "\nUser:") == [tokenizer.encode("\nUser:", add_special_tokens=False)[1:]]


def test_words_match_in_context(tokenizer):
    def contains(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids)))

    sentence = tokenizer.encode("The capital of France is Paris.\n(Paris)", add_special_tokens=False)
    spaced_paris, glued_paris = word_token_ids(tokenizer, "Paris")[::-1]
    assert contains(sentence, spaced_paris) and contains(sentence, glued_paris)
    assert contains(sentence, word_token_ids(tokenizer, ".")[0])
    # A plain encode of the word is the spaced form; '.' alone would be '▁.' and never fire.
    assert tokenizer.encode(".", add_special_tokens=False) == word_token_ids(tokenizer, ".")[1]


def test_special_token_names_in_words_are_text(tokenizer):
    assert word_token_ids(tokenizer, "</s>")[0] == encode_plain(tokenizer, "\n</s>")[2:]
    assert tokenizer.eos_token_id not in words_list(tokenizer, ["</s>"])[0]


def test_an_empty_word_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        word_token_ids(tokenizer, "")


_words = st.lists(st.sampled_from([*"abcXYZ019.,:!?-#<>/日本😀é", "</s>", "<unk>"]), min_size=1, max_size=8).map("".join)


@SETTINGS
@given(prefix=st.text(st.sampled_from("abc xyz.,\n日"), max_size=12).map(lambda p: p + "q"), word=_words)
def test_every_word_form_spells_the_word_and_fires_after_a_space(tokenizer, table, prefix, word):
    forms = word_token_ids(tokenizer, word)
    spelled = [b"".join(table[i] for i in ids).decode() for ids in forms]
    assert set(spelled) == {word, " " + word}
    ids = encode_plain(tokenizer, prefix + " " + word)
    spaced = forms[spelled.index(" " + word)]
    assert ids[-len(spaced):] == spaced
    array = words_list(tokenizer, [word])
    assert array[1, :len(forms)].tolist() == np.cumsum([len(f) for f in forms]).tolist()
