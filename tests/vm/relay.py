"""QEMU's guestfwd `-cmd:` runs this once per guest connection, the connection on stdin and
stdout: it joins them to a TCP port on the host's 127.0.0.1 (argv[1]), where the fake listens."""

import os
import socket
import sys
import threading


def guest_to_host(host):
    while data := os.read(0, 65536):
        host.sendall(data)
    host.shutdown(socket.SHUT_WR)


host = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
threading.Thread(target=guest_to_host, args=(host,), daemon=True).start()
while data := host.recv(65536):
    while data:
        data = data[os.write(1, data):]
# The host side closed: so does the guest's connection, as this process exits.
