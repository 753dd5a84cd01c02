#!/usr/bin/env python3
"""Convert a Hugging Face Mixtral checkpoint to a TensorRT-LLM 1.2.1 checkpoint, or verify one.

    build/convert_checkpoint.py convert SRC OUT [--tp-size 4] [--dtype float16] ...
    build/convert_checkpoint.py verify SRC OUT
"""

import sys

from mixtral_triton.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
