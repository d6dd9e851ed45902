"""The deepfake-detection service: image intake, spectral features, a linear model, storage.

Importing this package is cheap on purpose (numpy, scipy.fft, Pillow): the gateway measures
launch-to-ready, so scikit-learn is imported only inside :mod:`deepfake.training`.
"""
