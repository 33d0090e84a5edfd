"""PyTorch trainers that produce geomprobe activation files (installed as geomprobe.trainers).

Modules (import them directly; this package imports nothing heavy):

* ``data``        offline datasets (CIFAR-10/100, SVHN, MNIST / Fashion-MNIST, digits, synthetic spheres)
* ``noise``       seeded label permutation of paper 003
* ``models``      the seed papers' models (``build_model``)
* ``capture``     forward-hook capture of any nn.Module -> activation files; P x M subset sampling
* ``train``       the training loop (``TrainConfig``, ``train``), resumable checkpoints, JSONL log
* ``checkpoint``  atomic checkpoints, relative weight distance, layer rewinding
* ``gradstats``   gradient alignment statistics without per-example gradients, gradient split
* ``options``     experiment options and presets (torch-free)
* ``experiments`` the four experiments behind ``geomprobe train``
"""
