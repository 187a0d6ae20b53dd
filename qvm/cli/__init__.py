"""The `qvm` command line: a thin Typer layer over the core (see ``qvm.cli.main``)."""

import gc


def run() -> None:
    """The ``qvm`` console script.

    Importing Typer and Click allocates enough objects to trigger the cyclic garbage
    collector several times, for nothing: it finds no garbage in freshly imported modules.
    Measured, that is 10 to 20 ms of a 110 ms `qvm status`. So collection is off until
    the command's modules are loaded; ``qvm.cli.main.main`` freezes them and turns it on.
    """
    gc.disable()
    from qvm.cli.main import main

    main()
