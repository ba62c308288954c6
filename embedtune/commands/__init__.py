"""The ``embedtune`` commands, each ``main(argv) -> int``; they parse arguments and call the library."""
