"""Text out of token ids: streaming detokenization, stop strings, and stop/bad word lists."""

from mixtral_triton.text.detokenizer import Detokenizer, load_token_table, token_table
from mixtral_triton.text.stops import StopMatcher, TextStream
from mixtral_triton.text.words import word_token_ids, words_list

__all__ = ["Detokenizer", "StopMatcher", "TextStream", "load_token_table", "token_table", "word_token_ids", "words_list"]
