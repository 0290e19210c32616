"""What the export and the import share: the onnx import with its install hint, the error type,
and the metadata keys a cnn_gpu file carries."""
from __future__ import annotations

from types import ModuleType

OPSET = 17  # what export writes: onnxruntime, TensorRT and onnx.reference all run it
IR_VERSION = 8  # the IR of opset 17; current onnxruntime releases accept it
MIN_IMPORT_OPSET = 6

# metadata_props keys of an exported file (values are strings; the lists are JSON)
INPUT_LAYOUT = "input_layout"  # "NHWC": the graph's input and image outputs are channels-last
INPUT_SHAPE = "input_shape"  # JSON [H, W, C]
CLASS_NAMES = "class_names"  # JSON list of strings, index = class
NORM_MEAN = "normalization_mean"  # JSON list, per channel, in [0, 1] pixel units
NORM_STD = "normalization_std"
PREPROCESSING = "preprocessing"  # the formula, in words


class OnnxError(ValueError):
    """A model that cannot be exported, or an ONNX file that cannot be imported; the message names
    the node (its path, or its ONNX name and operator) and what is not supported."""


def require_onnx() -> ModuleType:
    """The onnx module, or an ImportError that says how to install it."""
    try:
        import onnx  # noqa: PLC0415 - an optional dependency, imported when used
    except ImportError as exc:
        raise ImportError("cnn_gpu.onnx needs the onnx package: pip install 'cnn_gpu[onnx]' "
                          f"(onnx and onnxruntime) ({exc})") from exc
    return onnx


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`, ... whichever is not in `taken`; it is added to `taken`."""
    base, k = name, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
