"""The WebGPU device (wgpu-py): adapter choice, limits, and the one error a user sees when there is none.

Mirrors web/device.js: request an adapter, ask only for the limits the artifact needs (never more than granted),
and say plainly what is missing.
"""
from __future__ import annotations

import os
import tempfile

from compiler.errors import KilnError, ModelTooLargeError
from compiler.kernels import OPTIONAL_FEATURES

NO_ADAPTER_HELP = ("no WebGPU adapter found. On Debian/Ubuntu install a Vulkan driver: "
                   "`sudo apt-get install -y mesa-vulkan-drivers libvulkan1` (CPU fallback: lavapipe), "
                   "or run `make setup`")


class NoAdapterError(KilnError):
    pass


class FeatureMissingError(KilnError):
    """The artifact's kernels need a WebGPU feature the adapter lacks (web/device.js: FeatureMissingError)."""


_device = None


def _quiet_env():
    # lavapipe warns about XDG_RUNTIME_DIR on every start when it is unset (containers, CI)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        d = os.path.join(tempfile.gettempdir(), f"kiln-xdg-{os.getuid()}")
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = d


def get_adapter():
    _quiet_env()
    try:
        import wgpu
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu raises RuntimeError when no backend/adapter exists
        # its first line is "Request adapter failed (3): Validation Error"; the last says what was tried, e.g.
        # "No suitable graphics adapter found; ... vulkan drivers/libraries could not be loaded, ..."
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise NoAdapterError(f"{NO_ADAPTER_HELP} (wgpu: {lines[-1] if lines else type(e).__name__})") from None
    if adapter is None:
        raise NoAdapterError(NO_ADAPTER_HELP)
    return adapter


CPU_ADAPTERS = ("llvmpipe", "lavapipe", "swiftshader")   # software Vulkan: invocations run as SIMD lanes of a CPU


def adapter_class(info) -> str:
    """"cpu" for a CPU Vulkan (lavapipe, SwiftShader), else "gpu": which program variants the artifact runs
    (compiler/schedule.py ADAPTER_VARIANTS). Mirrors web/device.js adapterClass; KILN_ADAPTER_CLASS overrides."""
    forced = os.environ.get("KILN_ADAPTER_CLASS")
    if forced:
        return forced
    text = " ".join(str(info.get(k, "")) for k in ("vendor", "architecture", "device", "description")).lower()
    if str(info.get("adapter_type", "")).lower() == "cpu" or any(n in text for n in CPU_ADAPTERS):
        return "cpu"
    return "gpu"


# a compute shader using WGSL's packed_4x8_integer_dot_product (the int8-activation kernels, compiler/kernels_i8.py)
_DOT4I8_PROBE = """@group(0) @binding(0) var<storage, read_write> o: array<i32>;
@compute @workgroup_size(1) fn main() { o[0] = dot4I8Packed(pack4xI8(vec4<i32>(o[1])), 0x01010101u); }"""


def supports_dot4i8(device) -> bool:
    """Whether the device compiles dot4I8Packed / pack4xI8 (WGSL language feature packed_4x8_integer_dot_product).
    wgpu-py does not report WGSL language features (wgpu.gpu.wgsl_language_features is empty), so a tiny pipeline
    is built instead. Mirrors web/device.js supportsDot4I8 (navigator.gpu.wgslLanguageFeatures there)."""
    import wgpu
    try:
        module = device.create_shader_module(code=_DOT4I8_PROBE, label="dot4i8-probe")
        device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
    except (wgpu.GPUError, RuntimeError, ValueError):
        return False
    return True


def get_device():
    """One device per process, with the adapter's full storage limits (the artifact is checked against them)."""
    global _device
    if _device is None:
        adapter = get_adapter()
        lim = adapter.limits
        wanted = {k: lim[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                      "max-storage-buffers-per-shader-stage", "max-compute-workgroup-storage-size",
                                      "max-compute-invocations-per-workgroup", "max-compute-workgroup-size-x",
                                      "max-compute-workgroup-size-y") if k in lim}
        features = [f for f in OPTIONAL_FEATURES if f in adapter.features]   # whatever an artifact may declare
        _device = adapter.request_device_sync(required_features=features, required_limits=wanted, label="kiln")
    return _device


def check_fits(device, manifest: dict, buffer_bytes: dict[str, int]):
    """Raise ModelTooLargeError, naming the limit, before any allocation when the artifact cannot run here."""
    missing = [f for f in manifest.get("features", []) if f not in device.features]
    if missing:
        raise FeatureMissingError(f"this model's shaders need WebGPU feature(s) {', '.join(missing)}, which the "
                                  "adapter does not offer; use an artifact compiled for f32")
    lim = device.limits
    need_bind = max([p["bytes"] for w in manifest["weights"].values() for p in w["parts"]] + list(buffer_bytes.values()))
    max_bind = min(lim["max-storage-buffer-binding-size"], lim["max-buffer-size"])
    if need_bind > max_bind:
        big = max(buffer_bytes, key=buffer_bytes.get)
        raise ModelTooLargeError(
            f"model needs a {need_bind / 2**20:.1f} MiB storage buffer ({big if buffer_bytes[big] == need_bind else 'a weight part'})"
            f" but the adapter allows {max_bind / 2**20:.1f} MiB; use a smaller --ctx or recompile")
    n_store = manifest["limits"]["storage_buffers_per_stage"]
    if n_store > lim["max-storage-buffers-per-shader-stage"]:
        raise ModelTooLargeError(f"kernels need {n_store} storage buffers per stage, adapter allows "
                                 f"{lim['max-storage-buffers-per-shader-stage']}")
