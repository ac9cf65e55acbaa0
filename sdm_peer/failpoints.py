"""Failpoints: named places where a test can make a process die as if killed (-9).

Set SDM_FAILPOINTS=name[,name...] in a process's environment; when it reaches a named place it
exits at once with status 137, without cleanup. `name=FILE` fires only once across processes:
in the first one to create FILE. Nothing happens when the variable is unset."""

import os

ENV = "SDM_FAILPOINTS"


def failpoint(name):
    for entry in filter(None, os.environ.get(ENV, "").split(",")):
        point, _, marker = entry.partition("=")
        if point != name:
            continue
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(137)
