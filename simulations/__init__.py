"""The one-machine simulation: a whole federation on Flower's simulation engine.

The hospitals it runs on come from :mod:`wardround.synthetic` (or a folder of site
folders); the study (:mod:`.study`) compares methods over such federations.
"""
