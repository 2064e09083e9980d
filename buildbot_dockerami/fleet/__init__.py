"""The per-master fleet: one service the workers register with, and each lifecycle
decision in a module named for it. Never imports buildbot's worker or process modules."""
