"""Training of the embedding model (the ``train`` extra): tf.data input and augmentation, backbone +
ArcFace, TPU/GPU/CPU strategy, the paper's learning-rate schedule, splits, validation through the
service's kNN head, threshold search, ensemble blending, Grad-CAM and robustness figures.

Importing the package does not import TensorFlow: ``training.synthetic`` runs in the serving
virtualenv too. The models are Keras 3 on its TensorFlow backend (the layers use tf ops and the
input pipeline is tf.data), so a ``KERAS_BACKEND`` left unset means TensorFlow here.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
