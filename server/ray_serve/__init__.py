"""Replicas on Ray Serve: one engine per device behind Ray Serve's HTTP proxy (the `ray` extra).

`deployment` is the Serve application (also the import path of Serve config files), `plan` the
settings that say how many replicas run and what each holds, `proxy_errors` the middleware that
gives Ray's own error answers the server's envelope, `replica_metrics` each replica's labelled
/metrics listener, and `cli` the `llada-server ray` command.
"""
