"""Failpoints: named places where a test can make a process die as if killed (-9).

Set SDM_FAILPOINTS=name[,name...] in a process's environment; when it reaches a named
place it exits at once with status 137, without cleanup. Nothing happens otherwise."""

import os

ENV = "SDM_FAILPOINTS"


def failpoint(name):
    if name in os.environ.get(ENV, "").split(","):
        os._exit(137)
