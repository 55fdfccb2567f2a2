"""The top floor: server bootstrap, the `serve`/`worker`/`up`/`demo` commands and local processes."""
