"""Which step errors mean a stage's accelerator can no longer be used.

Most errors of a step belong to its requests: those fail and the pipeline goes on. A CUDA fault
such as an illegal memory access, a device-side assert or an ECC error is different: it leaves
the process's CUDA context unusable (CUDA's documentation: the process must be restarted), so
the stage would fail every later step while its actor stays alive and the replica looks
healthy. Such a fault is handled like a dead stage: the stages are replaced (or, with one stage
in the replica's own process, the replica reports itself unhealthy and Serve replaces it).

Out-of-memory is not one of them: CUDA recovers from it, and it belongs to the step's size.
That includes allocations outside torch's caching allocator (pinned host memory, cuBLAS's
workspace), which torch 2.8+ raises as an AcceleratorError ("CUDA error: out of memory").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Messages of CUDA faults as torch raises them: `torch.AcceleratorError` since torch 2.8, a
# plain RuntimeError before ("CUDA error: an illegal memory access was encountered", cuBLAS and
# cuDNN status errors after a fault, NCCL's "unhandled cuda error").
DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "unhandled cuda error",
                        "device-side assert", "illegal memory access")
_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)
# Allocation failures, which leave the device usable: CUDA's and cuBLAS's own words for them.
OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation, an AcceleratorError's `error_code`


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: a RayTaskError's `cause` (the stage's own exception) and
    Python's exception chain; each error once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "cause", None)
        pending.extend(e for e in (wrapped, current.__cause__, current.__context__) if isinstance(e, BaseException))


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` (as a step raised it, possibly wrapped by Ray) is a CUDA fault that leaves
    its process's device unusable."""
    for cause in _causes(error):
        if _is_out_of_memory(cause):
            return False
        if _ACCELERATOR_ERROR is not None and isinstance(cause, _ACCELERATOR_ERROR):
            return True
        if isinstance(cause, RuntimeError) and any(marker in str(cause) for marker in DEVICE_FAULT_MARKERS):
            return True
    return False


def _is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, torch.OutOfMemoryError)
            or getattr(error, "error_code", None) == CUDA_ERROR_MEMORY_ALLOCATION
            or any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS))
