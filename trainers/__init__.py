"""PyTorch trainers that produce geomprobe activation files (installed as geomprobe.trainers)."""
