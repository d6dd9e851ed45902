"""The deepfake-detection service: image intake, provenance, spectral and resampling signals,
a linear model, the verdict rules, storage on SQLite or PostgreSQL.

Importing this package is cheap on purpose (numpy and Pillow; no scipy, no scikit-learn): the
gateway measures launch-to-ready, so scikit-learn is imported only inside
:mod:`deepfake.training`, and scipy where near-duplicates are hashed.
"""
