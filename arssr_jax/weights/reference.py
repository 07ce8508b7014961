"""Map the PyTorch reference's state_dict onto this project's Flax parameters.

Names: docs/REFERENCE.md section 2. Layouts: torch conv weights (out, in, kD, kH, kW) become
Flax kernels (kD, kH, kW, in, out); Linear weights (out, in) become (in, out).

Axis order: the reference saw volumes as SimpleITK arrays, the transpose of
nibabel's. With ``axis_order="nibabel"`` the spatial axes of every conv kernel are
reversed and so are the three coordinate entries of the decoder's (F + 3)-wide
input and stage-one output, so that ``ours(v) == transpose(reference(transpose(v)))``.
``axis_order="reference"`` keeps the reference's order.
"""

from __future__ import annotations

import collections
import re

import jax
import numpy as np

from arssr_jax.errors import ArSSRError
from arssr_jax.models import ENCODERS, ModelConfig, build_model, init_params
from arssr_jax.weights.torch_state_dict import read_state_dict

AXIS_ORDERS = ("nibabel", "reference")

# Key patterns that only one encoder's state_dict has: used to tell the user which
# encoder a file really holds when they named another.
_SIGNATURES = {
    "RDN": re.compile(r"^encoder\.rdbs\."),
    "ResCNN": re.compile(r"^encoder\.conv_start\."),
    "SRResNet": re.compile(r"^encoder\.features\."),
}


def _encoder_key(flax_name: str, encoder: str, options: dict) -> str:
    """Reference state_dict name of one Flax encoder layer (without .weight/.bias)."""
    if encoder == "RDN":
        name = re.sub(r"rdbs_(\d+)", r"rdbs.\1", flax_name)
        name = re.sub(r"layers_(\d+)", r"layers.\1", name)
        return re.sub(r"gff_(\d+)", r"gff.\1", name)
    if encoder == "ResCNN":
        match = re.fullmatch(r"block(\d+)_(\d+)", flax_name)
        if match:  # Sequential of (conv, ReLU) pairs: conv i sits at index 2 i.
            return f"block{match[1]}.{2 * int(match[2])}"
        return {"conv_start": "conv_start.0", "conv_end": "conv_end.0"}[flax_name]
    blocks = options.get("num_blocks", 18)
    match = re.fullmatch(r"res(\d+)_conv(\d)", flax_name)
    if match:
        return f"features.{match[1]}.m.{int(match[2]) - 1}.0"
    return {"head": "features.0.0", "body_end": f"features.{blocks + 1}.0", "tail": f"features.{blocks + 2}.0"}[
        flax_name
    ]


def _torch_key(path: tuple[str, ...], encoder: str, options: dict) -> str:
    """Reference name of one Flax parameter, e.g. ('encoder', 'rdbs_0', 'lff', 'kernel')."""
    part, *layers, leaf = path
    suffix = "weight" if leaf == "kernel" else "bias"
    if part == "decoder":
        stage, index = layers[0].rsplit("_", 1)  # Sequential of (Linear, ReLU) pairs.
        return f"decoder.{stage}.{2 * int(index)}.{suffix}"
    return f"encoder.{_encoder_key('.'.join(layers), encoder, options)}.{suffix}"


def _count(keys, pattern) -> int:
    """Number of distinct indices the pattern's group takes over the keys."""
    return len({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def _vote(state: dict, rules) -> int | None:
    """The size most tensors agree on: shape[dim] + add over every tensor whose key matches
    one of ``rules`` (pattern, dim, add); ties go to the earliest rule. A single damaged
    tensor is then outvoted, and the shape check names it rather than its neighbours."""
    values = []
    for pattern, dim, add in rules:
        for key in sorted(state):
            shape = np.shape(state[key])
            if re.fullmatch(pattern, key) and len(shape) > dim:
                values.append(int(shape[dim]) + add)
    if not values:
        return None
    counts = collections.Counter(values)
    most = max(counts.values())
    return next(v for v in values if counts[v] == most)


def _decoder_rules(depth: int):
    """(feature_dim rules, width rules) of the decoder's layers."""
    last = 2 * (depth // 2 - 1)
    features = [(r"decoder\.stage_(one|two)\.0\.weight", 1, -3), (rf"decoder\.stage_one\.{last}\.(weight|bias)", 0, -3)]
    hidden = "|".join(str(2 * i) for i in range(depth // 2 - 1)) or "none"
    inner = "|".join(str(2 * i) for i in range(1, depth // 2)) or "none"
    width = [(rf"decoder\.stage_(one|two)\.({hidden})\.(weight|bias)", 0, 0),
             (rf"decoder\.stage_(one|two)\.({inner})\.weight", 1, 0)]
    return features, width


def infer_config(state: dict, encoder: str, source: str = "state_dict") -> ModelConfig:
    """Model sizes read off the tensor shapes, so non-default reference models load too.

    Each size is the value most of the tensors that carry it agree on (see :func:`_vote`).
    """
    keys = list(state)
    first = state.get("decoder.stage_one.0.weight")
    if first is None or np.ndim(first) != 2:
        raise ArSSRError(f"{source} does not match an ArSSR reference model: missing 'decoder.stage_one.0.weight'")
    depth = 2 * len([k for k in keys if re.fullmatch(r"decoder\.stage_one\.\d+\.weight", k)])
    feature_rules, width_rules = _decoder_rules(depth)
    options: dict = {}
    try:
        if encoder == "RDN":
            state["encoder.sfe1.weight"], state["encoder.rdbs.0.layers.0.conv.weight"]  # noqa: B018 - required
            out = [(r"encoder\.output\.(weight|bias)", 0, 0)]
            options = {
                "num_features": _vote(state, [(r"encoder\.(sfe1|sfe2|gff\.0|gff\.1)\.(weight|bias)", 0, 0),
                                              (r"encoder\.(sfe2|gff\.1|output)\.weight", 1, 0),
                                              (r"encoder\.rdbs\.\d+\.lff\.(weight|bias)", 0, 0),
                                              (r"encoder\.rdbs\.\d+\.layers\.0\.conv\.weight", 1, 0)]),
                "growth": _vote(state, [(r"encoder\.rdbs\.\d+\.layers\.\d+\.conv\.(weight|bias)", 0, 0)]),
                "num_blocks": _count(keys, r"encoder\.rdbs\.(\d+)\."),
                "num_layers": _count(keys, r"encoder\.rdbs\.0\.layers\.(\d+)\."),
            }
        elif encoder == "ResCNN":
            state["encoder.conv_start.0.weight"]  # noqa: B018 - required
            out = [(r"encoder\.conv_end\.0\.(weight|bias)", 0, 0)]
            options = {
                "num_features": _vote(state, [(r"encoder\.(conv_start\.0|block\d+\.\d+)\.(weight|bias)", 0, 0),
                                              (r"encoder\.(block\d+\.\d+|conv_end\.0)\.weight", 1, 0)]),
                "num_blocks": _count(keys, r"encoder\.block(\d+)\."),
                "convs_per_block": len([k for k in keys if re.fullmatch(r"encoder\.block1\.\d+\.weight", k)]),
            }
        else:
            state["encoder.features.0.0.weight"]  # noqa: B018 - required
            blocks = _count(keys, r"encoder\.features\.(\d+)\.m\.")
            out = [(rf"encoder\.features\.{blocks + 2}\.0\.(weight|bias)", 0, 0)]
            options = {
                "num_features": _vote(state, [(rf"encoder\.features\.(0|\d+\.m\.\d|{blocks + 1})\.0\.(weight|bias)", 0, 0),
                                              (rf"encoder\.features\.(\d+\.m\.\d|{blocks + 1}|{blocks + 2})\.0\.weight", 1, 0)]),
                "num_blocks": blocks,
            }
    except KeyError as missing:
        raise ArSSRError(f"{source} does not match a {encoder} reference model: missing {missing}") from None
    feature_dim = _vote(state, feature_rules + out)
    width = _vote(state, width_rules) or int(first.shape[0])
    defaults = ModelConfig(encoder=encoder)
    default_options = {k: v for k, v in options.items() if v != _encoder_default(encoder, k)}
    try:
        return defaults.replace(
            feature_dim=int(feature_dim),
            decoder_width=int(width),
            decoder_depth=int(depth),
            encoder_options={k: int(v) for k, v in default_options.items()},
        )
    except (TypeError, ValueError) as error:
        raise ArSSRError(f"{source} does not describe a valid {encoder} reference model ({error})") from None


def _encoder_default(encoder: str, option: str):
    return getattr(ENCODERS[encoder], option)


def _to_flax(array: np.ndarray, path: tuple[str, ...], config: ModelConfig, nibabel: bool) -> np.ndarray:
    """One reference tensor in the Flax layout (and nibabel axis order if asked)."""
    if array.ndim == 5:  # conv (out, in, kD, kH, kW) -> (kD, kH, kW, in, out)
        array = array.transpose(2, 3, 4, 1, 0)
        if nibabel:
            array = array.transpose(2, 1, 0, 3, 4)
    elif array.ndim == 2:  # linear (out, in) -> (in, out)
        array = array.T
    if nibabel and path[0] == "decoder":
        array = _reverse_coordinate_entries(array, path, config)
    return np.ascontiguousarray(array, dtype=np.float32)


def _reverse_coordinate_entries(array, path, config: ModelConfig):
    """Reverse the 3 coordinate entries where a decoder layer reads or writes the (F + 3)-wide x."""
    layer, leaf = path[-2], path[-1]
    coord = slice(config.feature_dim, config.feature_dim + 3)
    last_of_stage_one = f"stage_one_{config.decoder_depth // 2 - 1}"
    array = array.copy()
    if layer in ("stage_one_0", "stage_two_0") and leaf == "kernel":  # reads x: input rows
        array[coord] = array[coord][::-1]
    if layer == last_of_stage_one:  # writes an update of x: output columns and bias
        array[..., coord] = array[..., coord][..., ::-1]
    return array


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def convert_state_dict(state: dict, encoder: str = "RDN", axis_order: str = "nibabel", source: str = "state_dict"):
    """Reference state_dict (name -> numpy array) -> (ModelConfig, Flax params)."""
    if encoder not in ENCODERS:
        raise ArSSRError(f"unknown encoder {encoder!r}: choose one of {', '.join(ENCODERS)}")
    if axis_order not in AXIS_ORDERS:
        raise ArSSRError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    held = [name for name, pattern in _SIGNATURES.items() if any(pattern.match(k) for k in state)]
    if held and encoder not in held:
        raise ArSSRError(f"{source} holds {held[0]} weights, not {encoder}: pass --encoder {held[0]}")
    config = infer_config(state, encoder, source)

    shapes = jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0)))
    expected = {_torch_key(path, encoder, dict(config.encoder_options)): path for path, _ in _flatten(shapes)}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        problem = []
        if missing:
            problem.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if extra:
            problem.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
        raise ArSSRError(f"{source} does not match a {encoder} reference model: {'; '.join(problem)}")
    params: dict = {}
    nibabel = axis_order == "nibabel"
    flax_shapes = dict(_flatten(shapes))
    wrong = [key for key, path in expected.items()
             if tuple(np.shape(state[key])) != _torch_shape(tuple(flax_shapes[path].shape))]
    if wrong:
        key = wrong[0]
        others = f" (and {len(wrong) - 1} other tensors)" if len(wrong) > 1 else ""
        raise ArSSRError(
            f"{source}: {key} has shape {tuple(np.shape(state[key]))} but the other tensors make this a {encoder} model "
            f"that needs {_torch_shape(tuple(flax_shapes[expected[key]].shape))} there{others}; "
            "the file is damaged or not a reference ArSSR state_dict (check --encoder)"
        )
    for key, path in expected.items():
        value = np.asarray(state[key])
        if value.dtype.kind not in "biuf":
            raise ArSSRError(f"{source}: {key} has {value.dtype} values, not real numbers; it is not a reference "
                             "ArSSR state_dict")
        if not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise ArSSRError(f"{source}: {key} holds {bad} NaN/Inf value(s); the weights are damaged, "
                             "re-download or re-save them")
        _set(params, path, _to_flax(value, path, config, nibabel))
    return config, params


def _torch_shape(flax_shape: tuple) -> tuple:
    """The reference's layout of a Flax parameter shape (inverse of :func:`_to_flax`)."""
    if len(flax_shape) == 5:  # (kD, kH, kW, in, out) -> (out, in, kD, kH, kW)
        return (flax_shape[4], flax_shape[3], *flax_shape[:3])
    if len(flax_shape) == 2:  # (in, out) -> (out, in)
        return flax_shape[::-1]
    return flax_shape


def load_torch_reference(path, encoder: str = "RDN", axis_order: str = "nibabel"):
    """Read a reference ``.pkl`` safely (no torch, no arbitrary pickle) -> (ModelConfig, params)."""
    state = read_state_dict(path)
    return convert_state_dict(state, encoder, axis_order, source=str(path))
