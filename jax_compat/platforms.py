"""Which JAX platforms a command-line run starts: the accelerators this machine has, so that a plugin installed for
chips it lacks (the CUDA plugin, libtpu: the test extras bring both) starts silently, and a broken one says so in one
line. Leans on JAX's plugin start-up logging (`jax._src.xla_bridge`) and the `jax_platforms` setting."""

from __future__ import annotations

import glob
import logging
import os

import jax

_BRIDGE_LOGGER = "jax._src.xla_bridge"


class PlatformError(RuntimeError):
    """The platforms the user asked for (JAX_PLATFORMS) cannot start; the message is one line."""


def nvidia_gpu_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def tpu_present() -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*") or os.environ.get("TPU_NAME")
                or os.environ.get("TPU_ACCELERATOR_TYPE"))


class _PluginFailures(logging.Filter):
    """Keeps JAX's plugin start-up tracebacks off the terminal and remembers their one-line cause."""

    def __init__(self):
        super().__init__()
        self.causes: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Jax plugin configuration error") or "CUDA-enabled jaxlib is not installed" in message:
            error = record.exc_info[1] if record.exc_info else None
            self.causes.append(_one_line(error) if error is not None else message.splitlines()[0])
            return False
        return True


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def choose_platforms(gpu: bool | None = None, tpu: bool | None = None) -> str | None:
    """Call before anything asks JAX for devices. Unless the user chose (JAX_PLATFORMS), starts TPU and CUDA only
    where the machine has them (default: detected), else the CPU alone. Returns one warning line when an NVIDIA GPU
    or TPU is present but its plugin did not start (the run goes on on the CPU), else None; raises PlatformError (one
    line) when the user's JAX_PLATFORMS cannot start."""
    asked = jax.config.jax_platforms
    gpu = nvidia_gpu_present() if gpu is None else gpu
    tpu = tpu_present() if tpu is None else tpu
    failures = _PluginFailures()
    logging.getLogger(_BRIDGE_LOGGER).addFilter(failures)
    try:
        if not asked:
            jax.config.update("jax_platforms", ",".join([*(["tpu"] if tpu else []), *(["cuda"] if gpu else []), "cpu"]))
        try:
            platforms = {device.platform for device in jax.devices()}
        except (RuntimeError, AssertionError) as e:
            cause = "; ".join(failures.causes) or _one_line(e)
            if asked:
                raise PlatformError(f"JAX_PLATFORMS={asked}: cannot start ({cause})") from None
            jax.config.update("jax_platforms", "cpu")
            platforms = {device.platform for device in jax.devices()}
    finally:
        logging.getLogger(_BRIDGE_LOGGER).removeFilter(failures)
    if asked and failures.causes and platforms <= {"cpu"} and "cpu" not in asked.split(","):
        raise PlatformError(f"JAX_PLATFORMS={asked}: cannot start ({'; '.join(failures.causes)})")
    missing = [name for name, present, platform in (("an NVIDIA GPU", gpu, "gpu"), ("a TPU", tpu, "tpu"))
               if present and not asked and platform not in platforms]
    if missing:
        cause = "; ".join(failures.causes) or "its JAX plugin is not installed"
        return (f"warning: this machine has {' and '.join(missing)} but JAX cannot use it ({cause}); running on the "
                f"CPU (set JAX_PLATFORMS={'cuda' if gpu else 'tpu'} to stop instead)")
    return None
