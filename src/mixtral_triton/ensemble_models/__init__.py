"""The logic of the Triton Python models (tokenizer, streaming detokenizer), kept out of
the model.py files so that it is tested like any library code."""
