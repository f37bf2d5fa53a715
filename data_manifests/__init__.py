"""Dataset manifests shipped with the project (CSV files; the format is in README.md here).

A package only so that the manifests install with the project; the loader is ``pipeline.core.manifest``.
"""
