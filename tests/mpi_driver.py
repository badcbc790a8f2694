"""The command line, run by each rank under ``mpiexec``, with a planted failure or an early stop.

Used by ``tests/test_distributed.py``::

    mpiexec -n 2 python -m tests.mpi_driver [--stop-after K] [--fail RANK:EPOCH:raise|kill] train ...

``--stop-after K`` ends training after K epochs in total (``train(stop_after=K)``),
as if the job had been stopped at that epoch boundary. ``--fail`` makes rank
RANK raise an error (or kill itself with SIGKILL) in the second step of epoch
EPOCH (1-based); every other rank trains on.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser(prog="mpi_driver")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--fail", metavar="RANK:EPOCH:HOW")
    args, rest = parser.parse_known_args()

    import reference.train as training
    from reference.cli import main as cli_main
    from reference.distributed import world

    if args.stop_after is not None:
        training.train = functools.partial(training.train, stop_after=args.stop_after)
    if args.fail is not None:
        rank, epoch, how = args.fail.split(":")
        original = training._train_step

        def failing_step(model, optimizer, method, ctx, *more, **named):
            if world().rank == int(rank) and ctx.epoch + 1 == int(epoch) and ctx.step == 1:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"planted failure in epoch {epoch}")
            return original(model, optimizer, method, ctx, *more, **named)

        training._train_step = failing_step
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
