"""One module per ``amflow`` subcommand: each defines ``add_parser(subparsers)`` and ``run(args)``."""
