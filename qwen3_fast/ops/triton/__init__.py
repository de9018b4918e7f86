"""Triton kernels (any NVIDIA GPU; on the CPU under TRITON_INTERPRET=1, slowly).

Each module mirrors a compiled op: ``<op>_forward`` / ``<op>_backward`` on 2-D tensors,
same signatures as the functions of the same name in qwen3_fast/ops/<op>.py minus the
backend argument. Imported lazily so that triton stays optional.
"""
