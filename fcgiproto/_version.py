"""The version, in one place: the distribution's metadata and `fcgi --version` read it here."""

__version__ = "0.2.0.dev0"
