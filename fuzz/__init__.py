"""Coverage-guided fuzz targets for fcgiproto (atheris); see fuzz/README.md.

Each ``fuzz_*.py`` runs as a script under atheris and, imported as
``fuzz.fuzz_*``, offers ``one_input(data)`` to replay an input without atheris.
"""
