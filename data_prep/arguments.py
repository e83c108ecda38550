"""argparse for every command of the project: a usage error is one line on stderr (exit status
2), like every other error, instead of the usage block followed by the error."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the options)\n")
