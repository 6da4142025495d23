"""Serving: the predictor shared by evaluation, `cbh predict` and the registered pyfunc."""
