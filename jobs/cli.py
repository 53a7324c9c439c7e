"""The command-line parser every job shares: a mistake in the arguments is one line, like every other bad input.

argparse prints its usage block (8 lines and more) before the error; a user scanning a SLURM log for
``error:`` should find one line naming the problem, and the job must exit with status 2.
"""
import argparse
import sys

from ddpm.errors import BAD_INPUT_EXIT_CODE


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (a mistyped value, an unknown option, a missing argument) are
    one ``error: ... (see python -m jobs.X --help)`` line on stderr and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
