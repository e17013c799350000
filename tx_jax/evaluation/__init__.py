"""Evaluations of trained models beyond their loss, shared by the training loop
(at every eval) and by `tx-jax eval`: frozen-encoder probes (linear probe,
k-NN, k-means NMI), image grids."""
