"""The buildbot glue: the latent worker class, worker_pool, the scheduling hooks and
launch on request."""
