"""The `dlrun-*` commands that work on finished run folders: report, predict, compress."""
