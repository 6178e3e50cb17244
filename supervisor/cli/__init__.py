"""The command line: `program` (parsing, exit codes, the global options), `commands` (one
handler per subcommand), `configcmd` (`config check` and `config show`), `tables` (output)."""
