"""`python -m tollgate`: the same as the `tollgate` command."""

from tollgate.cli import main

main()
