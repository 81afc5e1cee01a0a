"""The SM clock check reads the GPU torch calls the device, whatever ``CUDA_VISIBLE_DEVICES`` holds.

For each GPU of the host and each way of naming it (its NVML index, its whole UUID, a prefix of the
UUID), a fresh process with that ``CUDA_VISIBLE_DEVICES`` asks torch for ``cuda:0``'s UUID and
``diagnostics.clocks.nvml_handle`` for its NVML handle's UUID: they must be the same GPU. Needs a
GPU and ``nvidia-ml-py`` (``pynvml``); MIG instances are checked where ``nvidia-smi -L`` lists some.

python benchmarks/check_nvml_mapping.py
"""

from __future__ import annotations

import os
import subprocess
import sys

_CHILD = """
import torch, pynvml
from mfu_callbacks.diagnostics.clocks import nvml_handle
pynvml.nvmlInit()
handle = nvml_handle(pynvml, torch.device("cuda:0"))
uuid = pynvml.nvmlDeviceGetUUID(handle) if handle is not None else None
uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
print(str(torch.cuda.get_device_properties(0).uuid), uuid)
"""


def main() -> None:
    import pynvml

    pynvml.nvmlInit()
    uuids = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    migs = [line.split("UUID: ")[1].rstrip(")") for line in listed.splitlines() if "UUID: MIG-" in line]
    failures = 0
    for index, uuid in enumerate(uuids):
        for visible in (str(index), uuid, uuid[:12]):
            failures += _check(visible, expected=uuid)
    for mig in migs:  # the clock is its parent GPU's: the parent's UUID is expected
        parent = next(uuid for uuid in uuids if _parent_listed(listed, uuid, mig))
        failures += _check(mig, expected=parent)
    print("all mapped as torch maps them" if not failures else f"{failures} mismatches")
    raise SystemExit(1 if failures else 0)


def _check(visible: str, expected: str) -> int:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"CUDA_VISIBLE_DEVICES={visible}: failed: {result.stderr.strip()[-300:]}")
        return 1
    torch_uuid, nvml_uuid = result.stdout.split()
    # torch prints a GPU's UUID without its "GPU-"; a MIG instance's is its own, not the parent's.
    same = nvml_uuid == expected and (visible.startswith("MIG-") or torch_uuid in expected)
    print(
        f"CUDA_VISIBLE_DEVICES={visible}: torch {torch_uuid}, NVML handle {nvml_uuid}: {'ok' if same else 'WRONG'}"
    )
    return 0 if same else 1


def _parent_listed(listed: str, gpu_uuid: str, mig_uuid: str) -> bool:
    """Whether ``nvidia-smi -L`` lists the MIG instance under this GPU."""
    current = None
    for line in listed.splitlines():
        if line.startswith("GPU "):
            current = line
        elif mig_uuid in line:
            return current is not None and gpu_uuid in current
    return False


if __name__ == "__main__":
    main()
