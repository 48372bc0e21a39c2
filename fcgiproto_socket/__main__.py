"""`python -m fcgiproto_socket`: the `fcgi` command."""

from ._cli import main

raise SystemExit(main())
