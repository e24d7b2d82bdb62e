"""Synthetic hospitals and the one-machine simulation runner.

:func:`wardround.simulations.synth.synthesize_federation` writes sites made of real
DICOM files, an EHR Parquet table and a ``site.toml`` each. The findings to predict
are latent per patient; the image, the EHR values and the free-text note each show a
partial, noisy view of them, so a model that fuses the three beats any one alone.
"""
