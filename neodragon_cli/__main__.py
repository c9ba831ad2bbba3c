"""`python -m neodragon_cli ...` (and `torchrun -m neodragon_cli ...`) run the CLI."""

from neodragon_cli.app import main

main()
