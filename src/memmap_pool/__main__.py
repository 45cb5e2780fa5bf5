"""``python -m memmap_pool``: the ``memmap-pool`` command."""

from __future__ import annotations

# Workers started by spawn or forkserver import the main module under another name; the
# guard keeps them from running the command again.
if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main())
