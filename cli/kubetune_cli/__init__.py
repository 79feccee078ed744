"""The `kubetune` command line: run a FineTuneJob locally, run a local development cluster, inspect jobs.

One module per subcommand (`run`, `validate`, `status`, `plot`, `logs`, `dev`); each exposes
`register(subparsers)`. Heavy imports (torch, Ray, the Kubernetes client) happen inside the commands that
need them, so that `kubetune validate` and a bad manifest given to `kubetune run` answer in well under a second.
"""
