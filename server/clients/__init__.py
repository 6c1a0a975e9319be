"""Clients of a running server that ship with it: the terminal chat and the lm-eval backend."""
