"""Hand-written Triton kernels used by autotp.

Submodules are imported explicitly (e.g. ``autotp.kernels.flash_attention``)
so that importing this package never pulls in Triton by itself; this keeps
``TRITON_INTERPRET`` settable by callers right up to the point of use.
"""
