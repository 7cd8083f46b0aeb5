"""The model checkpoint format: a folder with ``weights.safetensors`` and ``config.json``.

* ``weights.safetensors``: the network's ``state_dict`` (safetensors; never pickle, so loading cannot execute code).
* ``config.json``: everything needed to rebuild the network and to know what it is: the caller's fields (``preset``,
  ``method``, ``R``, the training config, ...), plus ``architecture`` (``"songunet"``, ``"ncsnv2"`` or ``"modl"``),
  the network's complete resolved config under its own key (``unet``: :class:`~adps.nn.unet.UNetConfig`,
  ``ncsnv2``: :class:`~adps.nn.ncsnv2.NCSNv2Config`, ``modl``: :class:`~adps.nn.modl.MoDLConfig`), ``precond``
  (when an :class:`~adps.nn.precond.EDMPrecond` was saved), ``versions`` and ``format``. A config without
  ``architecture`` (written before the baselines existed) is a SongUNet.

Each file is written under a temporary name in the same folder and then renamed (``os.replace``, atomic on POSIX),
so a reader never sees a half-written file. Loading rebuilds the network from the config and refuses weights whose
tensor names, shapes or dtypes differ in any way from that network.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .ema import unwrap_model
from .modl import MoDL, MoDLConfig, build_modl
from .ncsnv2 import NCSNv2, NCSNv2Config, build_ncsnv2
from .precond import EDMPrecond
from .unet import SongUNet, UNetConfig, build_unet

__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "load_model", "save_model"]

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "adps-model/1"

# The networks a checkpoint can hold: architecture name -> (class, config class, key of its
# resolved config in config.json, preset builder for configs that give only "preset").
_ARCHITECTURES: dict[str, tuple[type[nn.Module], Any, str, Any]] = {
    "songunet": (SongUNet, UNetConfig, "unet", build_unet), "ncsnv2": (NCSNv2, NCSNv2Config, "ncsnv2", build_ncsnv2),
    "modl": (MoDL, MoDLConfig, "modl", build_modl)
}
# Configs written before "architecture" existed hold a SongUNet.
_DEFAULT_ARCHITECTURE = "songunet"

# Keys that save_model owns; a caller's value for them would be silently wrong.
_RESERVED = ("architecture", *(key for _, _, key, _ in _ARCHITECTURES.values()), "precond", "versions", "format")
# How many offending keys an error message lists before "...".
_MAX_KEYS_SHOWN = 5


def _versions() -> dict[str, str]:
    """Library versions recorded with the weights (for provenance, not checked on load)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        adps_version = version("adps")
    except (ImportError, PackageNotFoundError):
        adps_version = getattr(sys.modules.get("adps"), "__version__", "unknown")
    return {"adps": str(adps_version), "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", "unknown"), "python": sys.version.split()[0]}


def _write_atomically(target: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file onto ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:  # durable before it becomes visible
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(path_dir: str | os.PathLike[str], model: nn.Module, config: dict[str, Any]) -> Path:
    """Save ``model`` (a :class:`SongUNet`, :class:`NCSNv2` or :class:`MoDL`, bare or inside an :class:`EDMPrecond`)
    to a folder.

    Args:
        path_dir: the checkpoint folder (created if needed; existing files are replaced).
        model: the network; DDP / torch.compile wrappers are looked through.
        config: JSON-serialisable description: preset, method, R, training config, ... (``architecture``, the network
            config, ``precond``, ``versions`` and ``format`` are filled in here).

    Returns:
        The checkpoint folder.
    """
    model = unwrap_model(model)
    precond: dict[str, Any] | None = None
    if isinstance(model, EDMPrecond):
        precond = {"type": "edm", "sigma_data": model.sigma_data, "image_channels": model.image_channels,
                   "scale_cond": model.scale_cond}
        net = unwrap_model(model.net)
    else:
        net = model
    architecture = next((name for name, (cls, *_) in _ARCHITECTURES.items() if isinstance(net, cls)), None)
    if architecture is None:
        known = ", ".join(cls.__name__ for cls, *_ in _ARCHITECTURES.values())
        raise TypeError(f"save_model: expected one of {known} (or an EDMPrecond around one), got {type(net).__name__}")
    clashes = [k for k in _RESERVED if k in config]
    if clashes:
        raise ValueError(f"save_model: config keys {clashes} are reserved (written by save_model)")

    record = dict(config)
    record.update({"architecture": architecture, _ARCHITECTURES[architecture][2]: net.config.to_dict()})
    if precond is not None:
        record["precond"] = precond
    record.update(versions=_versions(), format=FORMAT)
    try:
        config_text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"save_model: config is not JSON-serialisable: {err}") from err

    # safetensors wants contiguous CPU tensors that share no storage; a copy guarantees it.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in net.state_dict().items()}

    folder = Path(path_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    # Weights first: a reader that meets new weights with the old config gets a clear mismatch error from load_model
    # rather than silently wrong numbers.
    _write_atomically(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8"))
    return folder


def _build_from_config(config: dict[str, Any], config_path: Path) -> nn.Module:
    """The network described by a checkpoint config (without weights)."""
    architecture = config.get("architecture", _DEFAULT_ARCHITECTURE)
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"{config_path}: unknown architecture {architecture!r}; "
                         f"expected one of {sorted(_ARCHITECTURES)}")
    cls, config_cls, key, build = _ARCHITECTURES[architecture]
    try:
        if key in config:
            # The resolved config: independent of later changes to the presets.
            return cls(config_cls.from_dict(config[key]))
        if "preset" in config:
            return build(config["preset"], **config.get("overrides", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: cannot build the {architecture} network: {err}") from err
    raise ValueError(f"{config_path}: neither {key!r} nor 'preset' given; cannot rebuild the {architecture} network")


def _short(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def _check_tensors(weights_path: Path, config_path: Path, found: dict[str, Tensor],
                   expected: dict[str, Tensor]) -> None:
    """Raise ValueError unless ``found`` has exactly the names, shapes and dtypes of ``expected``."""
    common = sorted(set(found) & set(expected))
    checks = {
        "missing tensor(s)": sorted(set(expected) - set(found)),
        "unexpected tensor(s)": sorted(set(found) - set(expected)),
        "shape mismatch (file vs config) for": [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
                                                for k in common if found[k].shape != expected[k].shape],
        "dtype mismatch (file vs config) for": [f"{k} {found[k].dtype} vs {expected[k].dtype}"
                                                for k in common if found[k].dtype != expected[k].dtype],
    }
    problems = [f"{what} {_short(keys)}" for what, keys in checks.items() if keys]
    if problems:
        raise ValueError(f"{weights_path}: weights do not match the network described by {config_path}: "
                         + "; ".join(problems))


def load_model(path_dir: str | os.PathLike[str],
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_model`.

    Returns:
        ``(model, config)``: the model (an :class:`EDMPrecond` if one was saved, else the bare
        network) on ``device`` in eval mode, and the parsed ``config.json``.

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        ValueError: a file is unreadable, or the weights do not fit the config exactly.
    """
    folder = Path(path_dir)
    config_path = folder / CONFIG_FILE
    weights_path = folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if "R" in config and "r_train" not in config:  # written before the training acceleration was named r_train
        config["r_train"] = config.pop("R")

    net = _build_from_config(config, config_path)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file: {err}") from err
    _check_tensors(weights_path, config_path, tensors, net.state_dict())
    net.load_state_dict(tensors, strict=True)

    model: nn.Module = net
    precond = config.get("precond")
    if precond is not None:
        if not isinstance(precond, dict) or precond.get("type") != "edm":
            raise ValueError(f"{config_path}: unsupported 'precond' entry {precond!r}")
        model = EDMPrecond(net, sigma_data=float(precond.get("sigma_data", 0.5)),
                           image_channels=int(precond.get("image_channels", 2)),
                           scale_cond=bool(precond.get("scale_cond", False)))
    return model.to(device).eval(), config
