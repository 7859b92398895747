"""TensorFlow's pooling allocator for host memory, switched on for the command-line scripts.

An XLA-compiled training step allocates one temporary buffer for all its intermediates and frees it when the
step ends, every step. TensorFlow's default CPU allocator takes it from ``malloc``, and glibc's ``malloc``
serves a block above its mmap threshold (which can be raised at run time to 32 MiB at most) with a fresh
``mmap`` and gives it back with ``munmap``: each step the kernel maps and zero-fills those pages again. On
2 cores at the character recipe's shape that kernel work took a quarter of the process's CPU time (a
``perf`` profile of the steps: ``clear_page``, page faults, unmapping) and made the compiled step ≈ 1.5×
slower (``python benchmarks/host_allocator.py`` measures it, side by side).

TensorFlow's BFC allocator (best-fit with coalescing, the one it uses for GPU memory) keeps freed blocks and
reuses them; ``TF_CPU_ALLOCATOR_USE_BFC=true`` makes it TensorFlow's host allocator. It grows as needed (up
to TensorFlow's limit for it, 64 GiB unless ``TF_CPU_BFC_MEM_LIMIT_IN_MB`` says otherwise) and does not
return memory to the system before the process ends, so a command's resident memory stays at its peak (the
recipe's peak was 5 % lower with it: the same benchmark). TensorFlow reads the variable when it first
allocates host memory, which no import does, so :func:`enable` works after ``import tensorflow``.

The commands (``train.py``, ``predict.py``, ``evaluate.py``, the export) call :func:`enable`; the Python API
does not, since the allocator is the whole process's choice (set the variable yourself for the same speed).
A value you set yourself (``TF_CPU_ALLOCATOR_USE_BFC=false`` for malloc) is left alone.
"""

from __future__ import annotations

import os

#: TensorFlow's switch for its host allocator ("true"/"1": BFC; "false"/"0": malloc, its default).
ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def enable() -> bool:
    """Make TensorFlow's host allocator the BFC allocator unless ``TF_CPU_ALLOCATOR_USE_BFC`` is already set.

    Effective when called before TensorFlow's first host allocation. Returns whether the BFC allocator is
    chosen (by this call or by the user)."""
    os.environ.setdefault(ENV, "true")
    return os.environ[ENV].strip().lower() in ("true", "1")
