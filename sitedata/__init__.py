"""A site's data, read as the site reads it.

``site.toml`` (``site_config``), the DICOM index, image decoding, EHR tables, the
study join, the per-patient split and the torch datasets. The package sits below
both the model families and the site: the site trains on it, and the demo's public
base (``wardround.models.public_base``) is pretrained on synthetic sites read
through the same loader.
"""
