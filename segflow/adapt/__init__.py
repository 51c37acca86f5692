"""Unsupervised domain adaptation: objectives of the one training engine that learn from a labelled
source domain and unlabelled target images (AdaptSegNet, MinEnt, AdvEnt, DACS)."""
