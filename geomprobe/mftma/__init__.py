"""MFTMA: replica mean-field theoretic manifold analysis (spec: shared/spec/mftma.md)."""
