"""Exit codes scripts can rely on, shared by every `kvpatch` command."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = "Exit codes: 0 ok, 1 a check failed or a snapshot was refused, 2 bad input, 130 interrupted."
