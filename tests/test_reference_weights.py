"""Reference .pkl files load safely and reproduce the PyTorch mirror exactly."""

import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arssr_jax.cli import main
from arssr_jax.coords import make_grid
from arssr_jax.errors import ArSSRError
from arssr_jax.models import predict
from arssr_jax.weights import load_model, load_torch_reference
from arssr_jax.testing.torch_reference import make_reference

VOLUME_SHAPE = (7, 9, 11)
SCALE = 1.7  # non-integer


def hr_shape(shape):
    return tuple(int(n * SCALE) for n in shape)


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).random(VOLUME_SHAPE).astype(np.float32)


@pytest.fixture(scope="module", params=["RDN", "ResCNN", "SRResNet"])
def saved_reference(request, tmp_path_factory):
    reference = make_reference(request.param, seed=3)
    path = tmp_path_factory.mktemp("weights") / f"ArSSR_{request.param}.pkl"
    torch.save(reference.state_dict(), path)
    return request.param, reference, path


def reference_output(reference, volume, transpose):
    """The mirror's prediction on the HR voxel-centre grid, in nibabel order."""
    v = volume.T if transpose else volume
    shape = hr_shape(v.shape)
    with torch.no_grad():
        out = reference(torch.from_numpy(np.ascontiguousarray(v))[None, None], torch.from_numpy(make_grid(shape))[None])
    out = out.numpy()[0, :, 0].reshape(shape)
    return out.T if transpose else out


def ours(model, params, volume):
    shape = hr_shape(volume.shape)
    out = predict(model, params, jnp.asarray(volume)[None, ..., None], jnp.asarray(make_grid(shape))[None])
    return np.asarray(out)[0, :, 0].reshape(shape)


@pytest.mark.parametrize("axis_order", ["nibabel", "reference"])
def test_outputs_match_the_reference(saved_reference, volume, axis_order):
    encoder, reference, path = saved_reference
    config, params = load_torch_reference(path, encoder=encoder, axis_order=axis_order)
    from arssr_jax.models import build_model

    expected = reference_output(reference, volume, transpose=axis_order == "nibabel")
    assert expected.std() > 1e-4  # non-trivial outputs
    got = ours(build_model(config), params, volume)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_convert_torch_cli_writes_a_loadable_model(saved_reference, volume, tmp_path, capsys):
    encoder, reference, path = saved_reference
    assert main(["convert-torch", str(path), str(tmp_path / "model"), "--encoder", encoder]) == 0
    model, params, config = load_model(tmp_path / "model")
    assert config.encoder == encoder
    expected = reference_output(reference, volume, transpose=True)
    assert np.abs(ours(model, params, volume) - expected).max() / np.abs(expected).max() <= 1e-5


def _one_line_error(call, match):
    with pytest.raises(ArSSRError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_wrong_encoder_named(tmp_path):
    path = tmp_path / "rescnn.pkl"
    torch.save(make_reference("ResCNN").state_dict(), path)
    message = _one_line_error(lambda: load_torch_reference(path, encoder="RDN"), "holds ResCNN weights")
    assert "--encoder ResCNN" in message


def test_missing_and_extra_keys(tmp_path):
    state = make_reference("ResCNN").state_dict()
    missing = dict(state)
    del missing["encoder.block2.4.weight"]
    torch.save(missing, tmp_path / "missing.pkl")
    _one_line_error(lambda: load_torch_reference(tmp_path / "missing.pkl", "ResCNN"), "missing 1 keys")
    extra = dict(state)
    extra["encoder.block2.99.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pkl")
    _one_line_error(lambda: load_torch_reference(tmp_path / "extra.pkl", "ResCNN"), "unexpected keys")


def test_wrong_shape(tmp_path):
    state = make_reference("ResCNN").state_dict()
    state["encoder.block1.2.weight"] = torch.zeros(64, 64, 3, 3, 2)
    torch.save(state, tmp_path / "shape.pkl")
    _one_line_error(lambda: load_torch_reference(tmp_path / "shape.pkl", "ResCNN"), "has shape")


def test_not_a_zip_and_not_a_state_dict(tmp_path):
    (tmp_path / "text.pkl").write_text("hello")
    _one_line_error(lambda: load_torch_reference(tmp_path / "text.pkl"), "not a zip")
    torch.save([1, 2], tmp_path / "list.pkl")
    _one_line_error(lambda: load_torch_reference(tmp_path / "list.pkl"), "state_dict")
    torch.save({"decoder.stage_one.0.weight": torch.zeros(4, 7)}, tmp_path / "partial.pkl")
    _one_line_error(lambda: load_torch_reference(tmp_path / "partial.pkl"), "does not match")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"encoder.sfe1.weight": _Exploit(marker)}, protocol=2))
    _one_line_error(lambda: load_torch_reference(path), "system")
    assert main(["convert-torch", str(path), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
