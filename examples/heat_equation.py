"""The heat equation on a plate: a time-stepping simulation with ``iterate``.

A square plate starts cold, with a few hot spots; its edges are insulated (the "edge"
boundary: no heat flows out). Each step applies the explicit five-point scheme
``u += alpha * laplacian(u)`` to every chunk on the pool's workers: the kernel reads the
previous state with a halo of one cell, and writes its chunk of the new state in place. The
two state buffers stay mapped in the workers for the whole run.

With ``--out state.npy`` the state is kept in that file with its step journal: interrupt the
run (Ctrl-C) and start it again with ``--resume`` to continue where it stopped, or with more
``--steps`` to go further. ``--check`` compares the result with the same loop run serially
in this process: they are equal bit for bit. The final state is written as a PNG.

Run it with::

    python examples/heat_equation.py [--size 2048] [--steps 500] [--png heat.png]
                                     [--out state.npy [--resume]] [--check]
"""

from __future__ import annotations

import argparse

import numpy as np

from memmap_pool import MemmapPool
from memmap_pool.demo import write_png

ALPHA = 0.2  # alpha * dt / dx^2: stable up to 0.25


def laplacian(u):
    """The five-point Laplacian of the interior of ``u`` (one cell smaller on each side)."""
    return -4 * u[1:-1, 1:-1] + u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]


def heat_step(out, chunk, u, alpha):
    """Runs in a worker: the chunk's part of the next state, from ``u`` (the previous state,
    with one cell of halo all round)."""
    out[:] = u[chunk.interior(0)] + alpha * laplacian(u)


def initial_state(size):
    """A cold plate with hot spots, the same on every run."""
    rng = np.random.default_rng(3)
    u = np.zeros((size, size))
    for _ in range(12):
        y, x = rng.integers(size // 8, size - size // 8, 2)
        r = int(rng.integers(size // 64 + 1, size // 16 + 2))
        u[max(y - r, 0) : y + r, max(x - r, 0) : x + r] = rng.uniform(50, 100)
    return u


def serial(u0, steps, alpha):
    """The same scheme in one process, for --check."""
    u = u0.copy()
    for _ in range(steps):
        padded = np.pad(u, 1, mode="edge")
        u = padded[1:-1, 1:-1] + alpha * laplacian(padded)
    return u


def colour(u):
    """Temperatures as an RGB picture: black, red, yellow, white."""
    t = np.clip(u / max(float(u.max()), 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
    return (255 * rgb).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="cells per side")
    parser.add_argument("--steps", type=int, default=500, help="time steps")
    parser.add_argument("--png", default="heat.png", help="where to write the picture")
    parser.add_argument("--out", default=None, help="a .npy to keep the state in")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--check", action="store_true", help="compare with a serial loop")
    args = parser.parse_args()

    u0 = initial_state(args.size)
    with MemmapPool() as pool:
        job = pool.submit_iterate(
            heat_step, u0, args.steps, depth=1, boundary="edge", args=(ALPHA,),
            out=args.out, resume=args.resume,
        )  # fmt: skip
        final = job.wait()
        stats = job.stats
        print(
            f"{args.steps} steps of a {args.size}x{args.size} plate in {stats.wall_time:.2f} s "
            f"({stats.chunks} chunks run on {stats.workers} workers)"
        )
        # Insulated edges: the heat stays on the plate (up to rounding).
        print(f"total heat: {u0.sum():.6g} at the start, {float(final.sum()):.6g} at the end")
        write_png(args.png, colour(np.asarray(final)))
        print(f"wrote {args.png}")
        if args.check:
            assert np.array_equal(final, serial(u0, args.steps, ALPHA)), "differs from serial"
            print("OK: equal to the serial loop, bit for bit")
        del final


if __name__ == "__main__":
    main()
