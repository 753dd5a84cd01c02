#!/usr/bin/env python3
"""Write the random-weight test Mixtral in the on-hub layout (see --help).

    .venv/bin/python build/make_fixture.py out/hub/tiny
    .venv/bin/python build/make_fixture.py out/hub/real-shaped --size real-shaped --layers 1
"""
from mixtral_triton.fixture.cli import main

raise SystemExit(main())
