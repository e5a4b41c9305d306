"""The test suite as a package, so that pytest puts the repo root on sys.path and `tests.<module>` imports work
however pytest is started. Its folders are not packages: a folder with an __init__.py named like a distribution
(tests/kernels and the PyPI `kernels`) would shadow it wherever the folder's parent is on sys.path, e.g. for a
script run from tests/ (tests/test_import_names.py)."""
