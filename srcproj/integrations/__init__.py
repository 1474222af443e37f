"""Integrations with training frameworks; each is an optional extra, imported on its own.

- :mod:`srcproj.integrations.huggingface`: ``SrcprojCallback``, a ``transformers``
  ``TrainerCallback`` that records a ``Trainer`` run (``pip install srcproj[hf]``).
"""
