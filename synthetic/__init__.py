"""Synthetic hospitals: site folders made like a real site's, for demos and tests.

:func:`wardround.synthetic.hospitals.synthesize_federation` writes sites made of real
DICOM files, an EHR Parquet table and a ``site.toml`` each. The findings to predict
are latent per patient; the image, the EHR values and the free-text note each show a
partial, noisy view of them, so a model that fuses the three beats any one alone.

A data source, like a site's own stores: it builds on the pure core only, so the
simulation command, the loopback deployment and ``flwr run .`` on synthetic sites
can all write hospitals without loading the simulation engine.
"""
