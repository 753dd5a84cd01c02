"""The logic of the tokenizer model (a Triton Python model), kept out of its model.py so
that it is tested like any library code, and the engine request it leads to. The streaming
detokenizer is the C++ backend of mixtral_triton.cpp_detokenizer."""
