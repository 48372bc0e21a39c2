"""tests/webapp.py served on the listening socket inherited on fd 0.

Apache mod_fcgid and lighttpd's ``bin-path`` start the application
themselves and hand it a listening socket as its standard input. Neither
fcgiproto_socket.Server nor fcgiproto_anyio.serve can take a socket (they
bind the address they are given), so this program drives the sans-I/O core
directly: one connection at a time, one request at a time, which is all
either web server sends to one process.

Run from a copy of itself, webapp.py and the fcgiproto package in one
directory (see tests/webservers.py, install_app), so that the web server's
user can read everything it imports. What it writes to stderr goes to that
directory's app.log.
"""

from __future__ import annotations

import os
import socket
import sys

import webapp

from fcgiproto import (
    AbortRequest,
    BeginRequest,
    Params,
    RemoteProtocolError,
    Role,
    ServerConnection,
    StdinData,
    StdinEnd,
)

READ_SIZE = 256 * 1024


def serve_connection(conn: socket.socket) -> None:
    proto = ServerConnection(roles=(Role.RESPONDER,))
    params: dict[int, dict[str, str]] = {}
    bodies: dict[int, bytearray] = {}
    while not proto.closed:
        data = conn.recv(READ_SIZE)
        try:
            events = proto.receive_data(data)
        except RemoteProtocolError as exc:
            print(f"spawned_app: closing a connection: {exc}", file=sys.stderr)
            return
        for event in events:
            if isinstance(event, BeginRequest):
                params[event.request_id] = {}
                bodies[event.request_id] = bytearray()
            elif isinstance(event, Params):
                params[event.request_id] = {
                    name.decode("utf-8", "surrogateescape"): value.decode(
                        "utf-8", "surrogateescape"
                    )
                    for name, value in event.params.items()
                }
            elif isinstance(event, StdinData):
                bodies[event.request_id] += event.data
            elif isinstance(event, StdinEnd):
                rid = event.request_id
                for chunk in webapp.respond(params.pop(rid), bytes(bodies.pop(rid))):
                    proto.send_stdout(rid, chunk)
                    conn.sendall(proto.data_to_send())
                proto.end_request(rid)
            elif isinstance(event, AbortRequest):
                params.pop(event.request_id, None)
                bodies.pop(event.request_id, None)
                proto.end_request(event.request_id)
        out = proto.data_to_send()
        if out:
            conn.sendall(out)
        if not data:
            return


def main() -> None:
    print(f"spawned_app: started, pid {os.getpid()}, uid {os.getuid()}", file=sys.stderr)
    listener = socket.socket(fileno=0)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_connection(conn)
            except OSError as exc:  # the web server went away mid-request
                print(f"spawned_app: connection lost: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
