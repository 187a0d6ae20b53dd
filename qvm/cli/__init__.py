"""The `qvm` command line: a thin Typer layer over the core (see ``qvm.cli.main``)."""

import contextlib
import gc
import os
import sys


def run() -> None:
    """The ``qvm`` console script.

    Importing Typer and Click allocates enough objects to trigger the cyclic garbage
    collector several times, for nothing: it finds no garbage in freshly imported modules.
    Measured, that is 10 to 20 ms of a 110 ms `qvm status`. So collection is off until
    the command's modules are loaded; ``qvm.cli.main.main`` freezes them and turns it on.

    Once the command has finished, qvm leaves without the interpreter's teardown (freeing
    every module of Typer, Click and qvm one by one: about 7 ms of `qvm up`, measured):
    the core closes its files itself and registers no exit handlers, so there is nothing
    left for it to do but flush the output.
    """
    gc.disable()
    from qvm.cli.main import main

    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if isinstance(done.code, str):
            sys.stderr.write(done.code + "\n")
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away (`qvm list | head -1`): nothing more to say
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)
