"""The pool's HTTP front: every Serve app that clients reach checks client keys with `deployments.gateway.auth`."""
