"""The test suite, a package so that its helpers import as ``tests.tiny``, ``tests.checkpoints``, ...

pytest's default import mode puts the directory above the package (the repository root) on
``sys.path`` while it collects, so nothing here edits ``sys.path`` itself.
"""
