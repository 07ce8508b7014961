"""How much memory is free: on the host, and on JAX's default device.

Importing this module does not import JAX (the NIfTI reader uses it in processes that
never load JAX).
"""

from __future__ import annotations

import os

__all__ = ["host_available_bytes", "available_memory_bytes"]


def host_available_bytes() -> int:
    """The host's free memory: MemAvailable from /proc/meminfo, else free pages from sysconf."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (OSError, ValueError):
        return 2**63  # unknown: claim no limit rather than refuse everything


def available_memory_bytes() -> int:
    """Free memory of JAX's default device: bytes_limit - bytes_in_use on an accelerator, the host's on a CPU."""
    import jax  # here, not at the top: see the module's docstring

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return host_available_bytes()
