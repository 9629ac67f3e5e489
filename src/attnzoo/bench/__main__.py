"""``python -m attnzoo.bench``: the ``attnzoo bench`` subcommand on its own."""

import argparse
import sys

from attnzoo.bench import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m attnzoo.bench", description="attnzoo efficiency and quality benchmark")
add_arguments(parser)
sys.exit(main(parser.parse_args()))
