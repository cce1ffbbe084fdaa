"""Applications built on the kd_keras library: the `kd-keras` command line,
the demo, the paper reproductions and the plots.

They use only the library's public functions; the library never imports
them. Importing `kd_keras` does not load this package (nor matplotlib).
"""
