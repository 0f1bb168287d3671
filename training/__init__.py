"""Training of the embedding model (the ``train`` extra): tf.data input and augmentation, backbone +
ArcFace, TPU/GPU/CPU strategy, the paper's learning-rate schedule, splits, validation through the
service's kNN head, threshold search, ensemble blending, Grad-CAM and robustness figures.

Importing the package does not import TensorFlow: ``training.synthetic`` runs in the serving
virtualenv too.
"""
