"""The MLflow model registry: registering trained networks and pulling them back.

A registered model ``adps-<method>-r<R>`` is an MLflow *pyfunc* model logged "from code"
(:mod:`adps.orchestration.pyfunc_model`): its artifacts are the network's safetensors weights and JSON config
(:func:`adps.nn.checkpoint.save_model`), so loading it never unpickles anything. Its ``predict`` reconstructs slices:

* ``ambient``: A-OS, one call of the denoiser on ``[A^H y, mask]`` at sigma 0.003;
* ``modl`` / ``ssdu``: the unrolled network;
* ``edm`` / ``edm_l1`` / ``ncsnv2`` are priors: they reconstruct only through posterior sampling (``adps evaluate``,
  the samplers of :mod:`adps.nn.samplers`); ``predict`` refuses them.
* ``image`` models (``adps-image-p<erasure_p>``) are priors of RGB images, registered without the MRI signature;
  ``predict`` refuses them, pointing to ``adps evaluate`` and the samplers.

``predict`` takes a dict of arrays (what ``mlflow models serve`` parses from ``{"inputs": {...}}``): ``kspace`` and
``maps`` ``(N, C, H, W, 2)`` float32 with ``[real, imag]`` on the last axis (JSON has no complex numbers), ``mask``
``(N, W)`` bool; it returns the image ``(N, H, W, 2)`` float32. :func:`to_model_input` and :func:`image_from_output`
convert from and to complex tensors. In the compact format (:func:`compact_model_input`) each value is a base64
``.npy`` string, k-space and maps float16: 8x smaller requests for real-size slices. A bad request is answered with
what is wrong with it, never with the request itself (docs/training.md, "Serving").

Users pull a ready network with :func:`load_model` (also ``adps.load_model``)::

    net = adps.load_model("models:/adps-ambient-r4@latest")
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adps.nn.checkpoint import CONFIG_FILE
from adps.nn.checkpoint import load_model as load_folder
from adps.nn.reconstruct import A_OS_SIGMA, a_os, reconstruct
from adps.nn.samplers import METHOD_SAMPLERS
from adps.orchestration.tracking import process_tracking_uri, resolve_tracking_uri

__all__ = ["ALIAS", "CHAMPION", "PYFUNC_FILE", "RECONSTRUCTORS", "WEIGHTS_ARTIFACT", "compact_model_input",
           "encode_array", "image_from_output", "image_model_name", "input_example", "load_model", "model_description",
           "model_name", "pip_requirements", "predict_arrays", "register_model", "registered_name", "set_champion",
           "to_model_input"]

RECONSTRUCTORS = ("ambient", "modl", "ssdu")
"""Methods whose registered model's ``predict`` reconstructs (A-OS or the unrolled network)."""
CHAMPION = "champion"
"""The alias ``adps evaluate`` points at the version of each registered model it found best."""
ALIAS = "latest"
"""How users address the newest version: ``models:/adps-ambient-r4@latest``. MLflow 3 reserves this alias (setting
it is refused) and resolves it to the highest version number; :func:`register_model` sets only other aliases."""
WEIGHTS_ARTIFACT = "weights"
"""Name of the pyfunc artifact holding the safetensors weights and config.json."""
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def model_name(method: str, r_train: float) -> str:
    """The registry name of an MRI training run's model: ``adps-<method>-r<R>``."""
    return f"adps-{method}-r{r_train:g}"


def image_model_name(erasure_p: float) -> str:
    """The registry name of the natural-image model trained at ``erasure_p``: ``adps-image-p<p>`` (``adps-image-p0.6``;
    ``adps-image-p0`` for the model trained on clean images)."""
    return f"adps-image-p{erasure_p:g}"


def registered_name(config: Any) -> str:
    """The registry name of the model a training run (a :class:`~adps.orchestration.train_config.TrainConfig`)
    registers: :func:`image_model_name` for method ``image``, else :func:`model_name`."""
    if config.method == "image":
        return image_model_name(config.erasure_p)
    return model_name(config.method, config.r_train)


TRAINED_ON = {
    "ambient": "an ambient diffusion prior learned from k-space undersampled at R = {r} only (A-DPS / A-OS)",
    "edm": "an EDM prior learned from fully sampled images (DPS)",
    "edm_l1": "an EDM prior learned from L1-wavelet reconstructions at R = {r} (DPS)",
    "ncsnv2": "an NCSNv2 prior learned from fully sampled images (annealed Langevin)",
    "modl": "a MoDL unrolled network, supervised at R = {r}",
    "ssdu": "an SSDU unrolled network, self-supervised from k-space at R = {r}",
    "image": "an ambient diffusion prior of natural images learned with pixels erased at p = {p}",
}
"""What each method's registered model is, for its description in the registry."""


def model_description(name: str, config: Mapping[str, Any]) -> str:
    """The registered model ``name``'s description (Markdown): what it is, how to load and use it, and the aliases
    the platform sets. ``config``: the model's ``config.json`` (method, r_train or erasure_p)."""
    method = config["method"]
    what = TRAINED_ON[method].format(r=f"{float(config.get('r_train') or 1):g}", p=f"{float(config.get('erasure_p') or 0):g}")
    use = ("Reconstructs through posterior sampling (`adps evaluate`, `adps tune`); `predict` refuses it."
           if method not in RECONSTRUCTORS else
           "`predict` (and `mlflow models serve`) reconstructs slices: docs/training.md, \"Serving\".")
    return (f"{name}: {what}, trained by adps (Ambient Diffusion Posterior Sampling, Aali et al.). {use}\n\n"
            f"Load the network: `adps.load_model(\"models:/{name}@latest\")`. Aliases: `@latest` (MLflow's, the "
            f"newest version); `@{CHAMPION}` (set by `adps evaluate`: the version that scored best at its R_inf). "
            "Each version's tags name the run, dataset and commit that made it, and the sampler settings an "
            "`adps tune` search found (`adps.tuned.r<R_inf>.*`).")


def pip_requirements() -> list[str]:
    """The serving environment: the versions this process runs (inferring them costs MLflow 15-20 s per model)."""
    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "safetensors", "mlflow", "h5py")]


# Input and output conversion -------------------------------------------------------------------
def _pairs(array: Any) -> np.ndarray:
    array = torch.as_tensor(array).detach().cpu()
    if not array.is_complex():
        raise ValueError(f"expected a complex array, got {array.dtype}")
    return torch.view_as_real(array.to(torch.complex64).resolve_conj()).numpy()


def to_model_input(kspace: Any, maps: Any, mask: Any) -> dict[str, np.ndarray]:
    """``predict``'s input from complex k-space and maps ``(N, C, H, W)`` and a column mask ``(N, W)`` (any arrays)."""
    return {"kspace": _pairs(kspace), "maps": _pairs(maps),
            "mask": torch.as_tensor(mask).detach().cpu().to(torch.bool).numpy()}


def image_from_output(output: Any) -> Tensor:
    """The complex image ``(N, H, W)`` from ``predict``'s ``(N, H, W, 2)`` output."""
    return torch.view_as_complex(torch.as_tensor(np.ascontiguousarray(output), dtype=torch.float32))


def encode_array(array: Any) -> str:
    """``array`` as a compact request's string: a ``.npy`` file (dtype and shape in its header), base64-encoded."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def compact_model_input(kspace: Any, maps: Any, mask: Any, *, dtype: Any = np.float16) -> dict[str, str]:
    """:func:`to_model_input` in the compact request format (:func:`encode_array`), k-space and maps as ``dtype``
    (float16: a 16-coil 384 x 320 slice is 21 MB of JSON, not 171 MB as lists; float32, 42 MB, keeps every bit)."""
    arrays = to_model_input(kspace, maps, mask)
    return {key: encode_array(value if key == "mask" else value.astype(dtype)) for key, value in arrays.items()}


def _input_array(inputs: Mapping[str, Any], key: str) -> np.ndarray:
    """``inputs[key]`` as an array: nested lists, or a compact base64 ``.npy`` string."""
    if key not in inputs:
        raise ValueError(f"predict: input {key!r} missing; expected keys kspace, maps, mask (got "
                         f"{', '.join(map(repr, inputs)) or 'none'})")
    value = np.asarray(inputs[key])
    if value.dtype.kind not in "US":
        return value
    try:
        return np.load(io.BytesIO(base64.b64decode(str(value.reshape(-1)[0]), validate=True)), allow_pickle=False)
    except (ValueError, OSError, binascii.Error) as err:
        raise ValueError(f"predict: input {key!r} is a string but not a base64 .npy array (see "
                         f"compact_model_input): {type(err).__name__}: {str(err)[:200]}") from None


def _complex_input(inputs: Mapping[str, Any], key: str, ndim: int) -> Tensor:
    value = torch.as_tensor(_input_array(inputs, key))
    if value.is_complex():
        value = value.to(torch.complex64)
    elif value.ndim == ndim + 1 and value.shape[-1] == 2:
        value = torch.view_as_complex(value.to(torch.float32).contiguous())
    else:
        raise ValueError(f"predict: input {key!r} must be complex with {ndim} axes or float with {ndim + 1} axes "
                         f"ending in [real, imag], got shape {tuple(value.shape)} and dtype {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"predict: input {key!r} must have {ndim} axes (N, C, H, W), got shape {tuple(value.shape)}")
    return value


def predict_arrays(method: str, model: nn.Module, inputs: Mapping[str, Any], *, sigma: float = A_OS_SIGMA) -> np.ndarray:
    """Reconstruct the slices of ``inputs`` (see the module docstring) with ``model``: the image ``(N, H, W, 2)``
    float32 ``[real, imag]``. Raises ValueError for a natural-image model (method ``image``: it takes no k-space and
    reconstructs nothing in one pass) and for inputs of the wrong shape or type."""
    if method == "image":
        raise ValueError("predict: 'image' models are priors of natural images (a denoiser D(x, sigma[, mask])), not "
                         "MRI reconstructors: they reconstruct through posterior sampling, with `adps evaluate` or the "
                         "samplers of adps.nn (load the network with adps.load_model)")
    kspace, maps = _complex_input(inputs, "kspace", 4), _complex_input(inputs, "maps", 4)
    mask = torch.as_tensor(_input_array(inputs, "mask")).to(torch.bool)
    if mask.ndim == 1:
        mask = mask.expand(kspace.shape[0], -1)
    if maps.shape != kspace.shape or mask.shape != (kspace.shape[0], kspace.shape[-1]):
        raise ValueError(f"predict: shapes do not agree: kspace {tuple(kspace.shape)}, maps {tuple(maps.shape)} (same "
                         f"as kspace), mask {tuple(mask.shape)} (expected (N, W) = ({kspace.shape[0]}, "
                         f"{kspace.shape[-1]}))")
    device = next(model.parameters()).device
    kspace, maps, mask = kspace.to(device), maps.to(device), mask.to(device)
    with torch.no_grad():
        if method == "ambient":
            image = a_os(model, kspace, maps, mask, sigma=sigma)
        else:
            image = reconstruct(method, model, kspace, maps, mask)
    return torch.view_as_real(image.detach().to("cpu", torch.complex64)).numpy()


# Registration --------------------------------------------------------------------------------
def _signature():
    """Output and parameters only: an input schema would make MLflow check the inputs before ``predict`` (echoing the
    whole request back for a missing key) and could not describe the compact format; ``predict`` checks them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 2), "image")]),
                          params=ParamSchema([ParamSpec("sigma", "double", A_OS_SIGMA)]))


def input_example(*, coils: int = 2, size: int = 16) -> dict[str, list]:
    """A small request (one ``size`` x ``size`` slice of ``coils`` coils, every other column sampled) stored with each
    registered reconstructor: the format, readable in MLflow's UI."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, coils, size, size)
    kspace = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    maps = torch.full(shape, coils ** -0.5, dtype=torch.complex64)
    mask = (torch.arange(size) % 2 == 0).unsqueeze(0)
    return {key: value.astype(np.float64).round(4).tolist() if value.dtype != bool else value.tolist()
            for key, value in to_model_input(kspace / size, maps, mask).items()}


def register_model(weights_dir: str | Path, *, tracking_uri: str, run_id: str, name: str,
                   tags: Mapping[str, str] | None = None, alias: str | None = None, description: str = "") -> Any:
    """Log the network in ``weights_dir`` (a :func:`~adps.nn.checkpoint.save_model` folder) as a pyfunc model of run
    ``run_id``, register it as a new version of ``name`` (``models:/<name>@latest`` then resolves to it), tag it and
    point ``alias`` (if any, other than ``latest``) at it; returns the
    :class:`mlflow.entities.model_registry.ModelVersion`. The adps package travels with the model (``code_paths``), so
    a serving machine needs only the pinned :func:`pip_requirements`. A natural-image model (``"method": "image"`` in
    its config.json) is logged without the MRI tensor signature (its ``predict`` refuses every input)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    model_config = _model_config(weights_dir)
    method = model_config["method"]
    signature = None if method == "image" else _signature()
    # Only reconstructors get an example: MLflow runs it through predict, which the priors refuse.
    example = input_example() if method in RECONSTRUCTORS else None
    with tempfile.TemporaryDirectory(prefix="adps-register-") as tmp, process_tracking_uri(tracking_uri):
        # Only the package's sources travel (no caches or editable-install leftovers).
        code = Path(tmp) / "adps"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # MLflow keeps an artifact folder's own name: copied to ``weights``, it lands at the fixed ``artifacts/weights``
        # that load_model looks for, whatever the checkpoint calls it.
        weights = Path(tmp) / WEIGHTS_ARTIFACT
        shutil.copytree(weights_dir, weights)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow suggests type hints and an input example: the signature replaces the hints, and priors have none.
            warnings.filterwarnings("ignore", message=".*(type hints|input example|signature).*", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_FILE), artifacts={WEIGHTS_ARTIFACT: str(weights)},
                code_paths=[str(code)], pip_requirements=pip_requirements(), signature=signature,
                input_example=example, registered_model_name=name, await_registration_for=60)
    version = str(info.registered_model_version)
    if description:
        client.update_model_version(name, version, description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description(name, model_config))
    if alias and alias.lower() != ALIAS:
        client.set_registered_model_alias(name, alias, version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return client.get_model_version(name, version)


def _model_config(weights_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the save_model folder ``weights_dir``."""
    path = Path(weights_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the model's config: {err}") from err
    if not isinstance(config, dict) or "method" not in config:
        raise ValueError(f"{path}: not a model config (a JSON object with 'method')")
    return config


# Loading -------------------------------------------------------------------------------------
def _weights_folder(local: Path) -> Path:
    """The save_model folder inside a downloaded pyfunc model (or ``local`` itself)."""
    for candidate in (local, local / "artifacts" / WEIGHTS_ARTIFACT):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{local}: neither an adps model folder (config.json + weights.safetensors) nor an adps "
                            f"pyfunc model (artifacts/{WEIGHTS_ARTIFACT}/)")


def load_model(
    uri: str | Path, *, device: str | torch.device = "cpu", tracking_uri: str | None = None, with_config: bool = False
) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """A ready network (eval mode, on ``device``) from the registry or a folder.

    Args:
        uri: ``models:/adps-ambient-r4@latest``, ``models:/<name>/<version>``, a bare registered name
            (``adps-ambient-r4``: its newest version, as in the configs' ``models``), ``runs:/<id>/model``, any MLflow
            artifact URI, or a local folder (a pyfunc model or a save_model folder).
        device: where the network goes.
        tracking_uri: the MLflow server or store (default as for training, :func:`resolve_tracking_uri`); a SQLite
            store that does not exist is an error naming it, never created.
        with_config: also return the model's config (method, R, preset, architecture, ...).
    """
    text = str(uri)
    if Path(text).exists():
        model, config = load_folder(_weights_folder(Path(text)), device=device)
    else:
        import mlflow

        if text.startswith("adps-"):
            text = model_uri(text)
        if "://" not in text and not text.startswith(("models:/", "runs:/")):
            raise FileNotFoundError(f"{text}: no such folder, and not a models:/ or runs:/ URI or a registered "
                                    "adps-* name")

        tracking_uri = resolve_tracking_uri(tracking_uri or "", create=False)
        # A model is ~50 small files: MLflow's progress bar would print a line per load in every Ray task and trial.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # models:/ URIs are resolved through the *registry* URI, which follows the process-wide tracking URI, not
        # download_artifacts' tracking_uri argument.
        with tempfile.TemporaryDirectory(prefix="adps-model-") as tmp, process_tracking_uri(tracking_uri):
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tmp, tracking_uri=tracking_uri)
            except mlflow.exceptions.MlflowException as err:
                raise FileNotFoundError(f"{text}: not found in the MLflow store {tracking_uri}: {err.message}") from err
            model, config = load_folder(_weights_folder(Path(local)), device=device)
    return (model, config) if with_config else model

# Model entries (evaluate, tune, fid) --------------------------------------------------------------------------------------
CLASSICAL = ("l1", "zero_filled", "cg_sense")
"""``models`` entries that are reconstructions without a network (their method has the same name)."""


def model_uri(entry: str) -> str:
    """A ``models`` entry as something :func:`load_model` opens."""
    if entry in CLASSICAL or "://" in entry or entry.startswith(("models:/", "runs:/")) or Path(entry).exists():
        return entry
    if entry.startswith("adps-"):
        return f"models:/{entry}@latest"
    raise ValueError(f"config key 'models': {entry!r} is neither a models:/ or runs:/ URI, a registered adps-* "
                     f"name, an existing folder, nor one of {', '.join(CLASSICAL)}")


def load_model_entry(uri: str, device: str,
                     tracking_uri: str | None = None) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The network and its config (a :data:`CLASSICAL` entry: no network, method = the entry)."""
    if uri in CLASSICAL:
        return None, {"method": uri, "r_train": 1.0}
    return load_model(uri, device=device, tracking_uri=tracking_uri, with_config=True)


def model_label(config: dict[str, Any]) -> str:
    """``<method>_r<R_train>`` (the entry's name for a :data:`CLASSICAL` reconstruction)."""
    if config["method"] in CLASSICAL:
        return config["method"]
    return f"{config['method']}_r{float(config['r_train']):g}"


# Tuned settings: the tags an `adps tune` search leaves on a model version ----------------------------
TUNED_TAG = "adps.tuned.r{r_inf:g}.{key}"
"""Model-version tags an ``adps tune`` search leaves (``adps.tuned.r8.guidance``, ``.steps``)."""


def model_version_of(uri: str, tracking_uri: str) -> Any:
    """The registered model version a ``models:/name@alias`` / ``models:/name/N`` URI names, else None."""
    from mlflow import MlflowClient

    if not uri.startswith("models:/"):
        return None
    client = MlflowClient(tracking_uri)
    name, _, rest = uri[len("models:/"):].partition("@")
    if rest:
        return client.get_model_version_by_alias(name, rest)
    name, _, version = name.partition("/")
    return client.get_model_version(name, version) if version else None


def pin_model_entry(entry: str, tracking_uri: str) -> tuple[str, torch.nn.Module | None, dict[str, Any]]:
    """A ``models`` entry resolved once on a driver: ``(uri, network, config)``, the URI pinned to the registry version
    it names now (every task then loads that version, even if another is registered meanwhile) and the config holding
    that version's tags as ``_version_tags``. A wrong entry fails here, naming it, before any task starts."""
    uri = model_uri(entry)
    model, config = load_model_entry(uri, "cpu", tracking_uri)
    version = model_version_of(uri, tracking_uri)
    if version is not None:
        uri = f"models:/{version.name}/{version.version}"
    return uri, model, {**config, "_version_tags": dict(version.tags) if version is not None else {}}


def set_champion(winner: str, evaluated: list[str], tracking_uri: str, note: str) -> None:
    """Point :data:`CHAMPION` at the registry version ``winner`` (``models:/<name>/<version>``), tagged
    ``adps.champion_of`` = ``note``; an ``evaluated`` version that holds the alias of its name and lost gives it up."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    for uri in {winner, *evaluated}:
        name, _, version = uri[len("models:/"):].partition("/")
        if uri == winner:
            client.set_registered_model_alias(name, CHAMPION, version)
            client.set_model_version_tag(name, version, "adps.champion_of", note)
            continue
        try:
            if client.get_model_version_by_alias(name, CHAMPION).version == version:
                client.delete_registered_model_alias(name, CHAMPION)
        except MlflowException:
            pass  # the name has no champion


TUNED_META = ("run_id", "budget", "split")
"""Keys of a search's tags that describe the search, not a setting (:func:`tuned_meta`)."""
TUNED_SPEED = ("seconds_per_slice", "fastest_seconds_per_slice")
"""Keys of a search's tags that record how fast its best and fastest settings ran (not settings)."""
FASTEST = "fastest"
"""The ``sampler`` of :func:`tuned_settings` for a search's fastest settings within its tolerance of the protocol's
quality (``adps.tuned.r<R>.fastest.<key>``)."""


def tuned_settings(tags: dict[str, str], r_inf: float, sampler: str = "") -> dict[str, float]:
    """The sampler settings a Ray Tune search at ``r_inf`` stored on the model version (or ``{}``), without the search's
    own description (:data:`TUNED_META`, :data:`TUNED_SPEED`). ``sampler``: empty for the model's own sampler's best
    (:data:`TUNED_TAG` with a plain key: ``guidance``, ``steps``, ...), :data:`FASTEST` for its fastest within the
    search's tolerance, ``"a_os"`` for A-OS's (``tune_spaces/a_os.yaml``); tags ``adps.tuned.r<R>.<sampler>.<key>``."""
    prefix = TUNED_TAG.format(r_inf=r_inf, key=f"{sampler}." if sampler else "")
    found = {}
    for tag, value in tags.items():
        key = tag[len(prefix):]
        # A dotted key belongs to another sampler's search (a_os.sigma under the plain prefix).
        if tag.startswith(prefix) and key not in (*TUNED_META, *TUNED_SPEED) and "." not in key:
            found[key] = float(value)
    return found


def tuned_meta(tags: dict[str, str], r_inf: float) -> dict[str, str]:
    """The ``run_id``, ``budget`` (trials) and ``split`` of the search behind a version's settings at ``r_inf`` (empty
    where the search predates them)."""
    return {key: tags.get(TUNED_TAG.format(r_inf=r_inf, key=key), "") for key in TUNED_META}


IMAGE_TUNED_TAG = "adps.tuned.{task}.{key}"
"""Model-version tags of an image search: ``task`` is ``cs`` / ``sr`` (``adps.tuned.cs.guidance``: what the image
evaluation reads with ``sampler_settings: best``) or ``cs_m<m>`` / ``sr_x<factor>`` (the searched setting's own)."""


def image_tuned_settings(tags: dict[str, str], task: str) -> dict[str, float]:
    """The settings a search for ``task`` stored on a model version (:data:`IMAGE_TUNED_TAG`), or ``{}``."""
    prefix = IMAGE_TUNED_TAG.format(task=task, key="")
    return {tag[len(prefix):]: float(value) for tag, value in tags.items()
            if tag.startswith(prefix) and tag[len(prefix):] != "run_id"}


def tag_tuned_settings(config: Any, best: dict[str, Any], run_id: str, *, sampler: str = "",
                       model_method: str = "") -> Any:
    """Store a search's best settings (and its ``run_id``; for MRI its ``budget`` and ``split``) as tags of the model
    version ``config.model`` names (an ``adps.orchestration.tune_config.SearchConfig``): :data:`TUNED_TAG` for MRI (the
    model's own sampler's keys plain, another's prefixed), :data:`IMAGE_TUNED_TAG` for an image task. Returns the
    tagged version."""
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking_uri)
    version = model_version_of(config.model, config.tracking_uri)
    if version is None:  # ``models:/name`` without version or alias: the newest version
        name = config.model[len("models:/"):]
        version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    # An MRI search also records its budget and split: the evaluation compares only models tuned alike.
    meta = {} if config.task else {"budget": config.num_samples, "split": config.split}
    own = METHOD_SAMPLERS.get(model_method) == sampler
    if not config.task and own:  # how fast the best ran, and the fastest settings within tolerance
        meta["seconds_per_slice"] = best.get("seconds_per_slice")
        fastest = best.get("fastest") or {}
        meta.update({f"{FASTEST}.{key}": value for key, value in fastest.get("settings", {}).items()})
        meta["fastest_seconds_per_slice"] = fastest.get("seconds_per_slice")
        stale = TUNED_TAG.format(r_inf=float(config.r_inf), key=f"{FASTEST}.")
        for tag in [tag for tag in version.tags if tag.startswith(stale)]:  # an earlier search's
            client.delete_model_version_tag(version.name, version.version, tag)
    for key, value in {**best["settings"], "run_id": run_id, **meta}.items():
        if value is None:
            continue
        if config.task:  # the task's tag (what the image evaluation reads) and the setting's own
            tags = [IMAGE_TUNED_TAG.format(task=task, key=key) for task in (config.task, config.image_setting)]
        else:
            # The model's own sampler owns the plain keys; another sampler's (A-OS) are prefixed.
            tagged = key if own else f"{sampler}.{key}"
            tags = [TUNED_TAG.format(r_inf=float(config.r_inf), key=tagged)]
        for tag in tags:
            client.set_model_version_tag(version.name, version.version, tag, str(value))
    return client.get_model_version(version.name, version.version)
