"""Data side of k2train: the shapes demo world, text encoder, latent spaces, loaders."""
