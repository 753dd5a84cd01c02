"""Liveness check for a Triton server of this project (the Kubernetes probe runs it):
`python3 -m mixtral_triton.launcher.liveness [--live-url URL]`.

Fails while a Python stub process is dead (see mixtral_triton.launcher.stubs: Triton 2.51
keeps reporting live and ready then, and only a restart brings the model back), or while
Triton's own liveness endpoint does not answer 200.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

from mixtral_triton.launcher.stubs import dead_stubs


def main(argv: list[str] | None = None) -> int:
    """Liveness check: exit 1, saying why, while any Python stub process is dead (or, with
    --live-url, while Triton's own liveness endpoint does not answer 200)."""
    p = argparse.ArgumentParser(prog="python3 -m mixtral_triton.launcher.liveness",
                                description="Fail while a Triton Python stub process is dead.")
    p.add_argument("--live-url", help="also require 200 from this URL, e.g. "
                   "http://127.0.0.1:8000/v2/health/live")
    args = p.parse_args(argv)
    dead = dead_stubs()
    if dead:
        print(f"dead Triton Python stub processes: {', '.join(map(str, dead))}; "
              "the server must be restarted", file=sys.stderr)
        return 1
    if args.live_url:
        try:
            with urllib.request.urlopen(args.live_url, timeout=5) as reply:
                if reply.status != 200:
                    raise OSError(f"HTTP {reply.status}")
        except OSError as exc:
            print(f"{args.live_url}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
