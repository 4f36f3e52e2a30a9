"""Install Weightsmith's missing dependencies (requirements.txt) with pip.

Run by A1111/Forge at start-up (their ``launch`` module is importable: use its pip helper) and by
ComfyUI-Manager after an install (no ``launch``: plain ``python -m pip``). It only installs what is
missing, never torch (every host brings its own build), and does nothing when all is present.
"""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _name(req):
    return re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]


def _satisfied(version, req):
    """Whether an installed ``version`` meets the requirement's specifier (``packaging`` where it
    is importable, as it is beside pip; without it only presence is checked)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion
    except ImportError:
        return True
    try:
        return Requirement(req).specifier.contains(version, prereleases=True)
    except (InvalidVersion, ValueError):
        return True


def missing(reqs):
    """Requirements that are not installed or installed at a version outside their specifier."""
    from importlib import metadata

    out = []
    for req in reqs:
        try:
            v = metadata.version(_name(req))
        except metadata.PackageNotFoundError:
            out.append(req)
            continue
        if not _satisfied(v, req):
            out.append(req)
    return out


# Packages a host pins (A1111 v1.10: torch 2.1, transformers 4.30.2 which needs huggingface_hub<1):
# held at their installed versions, so installing e.g. diffusers never upgrades them under the host.
HOLD = ("torch", "torchvision", "transformers", "huggingface_hub", "numpy", "safetensors", "gradio")


def held():
    from importlib import metadata

    out = []
    for name in HOLD:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def main():
    todo = missing(list(requirements()))
    if not todo:
        return
    try:
        import launch  # A1111 / Forge
    except ImportError:  # ComfyUI-Manager or by hand
        launch = None
    if launch is not None:
        pins = held()
        pinned = {_name(p).lower() for p in pins}
        too_old = [r for r in todo if _name(r).lower() in pinned]
        if too_old:  # the host pins these: upgrading them could break it, so say so instead
            print(
                "Weightsmith: the WebUI has "
                + ", ".join(p for p in pins if _name(p).lower() in {_name(r).lower() for r in too_old})
                + " but Weightsmith needs "
                + ", ".join(too_old)
                + "; not upgraded (the WebUI pins it). Update the WebUI, or upgrade it yourself at your own risk."
            )
            todo = [r for r in todo if r not in too_old]
            if not todo:
                return
        args = " ".join(f'"{r}"' for r in todo + pins)
        launch.run_pip(f"install {args}", "Weightsmith requirements: " + ", ".join(todo))
    else:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    main()
