"""The shipped demo model's task and harness (optional: no vLLM process imports it).

- :mod:`vllm_sab.demo.shapesqa`: ShapesQA, the synthetic visual question answering task
  ``models/shapes-llava`` was trained on (also the calibrator's ``--data builtin``);
- :mod:`vllm_sab.demo.evaluate`: ``sab-eval``, task accuracy of a full-precision or sab
  checkpoint on held-out ShapesQA with transformers and/or vLLM.

The product proper is the plugin (:mod:`vllm_sab`), the format (:mod:`vllm_sab.format`),
the kernels (:mod:`vllm_sab.kernels`) and the calibrator (:mod:`vllm_sab.calibrate`).
"""
