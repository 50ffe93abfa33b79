"""`python -m accuvqa` is the `accuvqa` command (so `torchrun -m accuvqa train ...` works)."""

from accuvqa.cli import main

main()
