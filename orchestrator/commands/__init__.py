"""One module per `edgecloud` subcommand group; each exposes `register(subparsers)`."""
