"""Nothing the platform loads can run code: a crafted pickle in place of a model, a training
checkpoint or a backbone weights file is refused with an error naming the file, and its
payload never runs. The sources hold no unsafe loader."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from adps.nn import build_modl
from adps.nn.checkpoint import load_model, save_model

PLATFORM = Path(__file__).resolve().parents[1] / "platform"


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``, proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _crafted_files(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """The payload as a raw pickle and inside torch.save's zip format."""
    zipped = tmp_path / "zipped.pt"
    torch.save({"weight": Payload(marker)}, zipped)
    return {"pickle": pickle.dumps(Payload(marker)), "torch.save": zipped.read_bytes()}


def test_a_crafted_pickle_is_proven_to_run_when_unpickled(tmp_path: Path) -> None:
    """The payload is live: plain unpickling runs it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 - the point of the test
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_model_weights_that_are_a_pickle_are_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    folder = save_model(tmp_path / "model", build_modl("tiny"), {"preset": "tiny", "method": "modl"})
    (folder / "weights.safetensors").write_bytes(_crafted_files(tmp_path, marker)[kind])
    with pytest.raises(ValueError, match=r"weights\.safetensors: not a readable safetensors file"):
        load_model(folder)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_backbone_weights_that_run_code_are_refused(tmp_path: Path, kind: str) -> None:
    """LPIPS / FID weights come from torchvision's .pth files, which are pickles by format:
    they are read with ``weights_only=True``, which refuses anything but tensors."""
    from adps.perceptual import WEIGHT_FILES, lpips_distance

    marker = tmp_path / "ran"
    path = tmp_path / WEIGHT_FILES["alexnet"]
    path.write_bytes(_crafted_files(tmp_path, marker)[kind])
    image = torch.ones(1, 16, 16, dtype=torch.complex64)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*refused"):
        lpips_distance(image, image, weights=path)
    assert not marker.exists(), "the payload ran"


def test_the_sources_hold_no_unsafe_loader() -> None:
    """No pickle / marshal / shelve loads, torch.load only with weights_only=True, no
    np.load with allow_pickle, no yaml.load without SafeLoader (yaml.safe_load is used)."""
    unsafe = re.compile(
        r"pickle\.loads?\(|marshal\.loads?\(|shelve\.open\(|cloudpickle\.loads?\(|allow_pickle\s*=\s*True"
        r"|yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load|torch\.load\((?![^)]*weights_only\s*=\s*True)"
    )
    assert unsafe.search("state = torch.load(path)") and unsafe.search("np.load(f, allow_pickle=True)")
    assert unsafe.search("yaml.load(text)") and not unsafe.search("torch.load(p, map_location='cpu', weights_only=True)")
    found = [f"{path.relative_to(PLATFORM)}:{number}: {line.strip()}"
             for path in sorted(PLATFORM.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1) if unsafe.search(line)]
    assert not found, found
