"""`python -m momctl ...` runs the command line (used by torchrun and where no console script is installed)."""

from .cli import main

main()
