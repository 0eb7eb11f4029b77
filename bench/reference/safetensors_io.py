"""A small safetensors reader and writer (the layout of model/checkpoint.h), so that the reference needs only torch.

    [8 bytes] N, little-endian u64      [N bytes] JSON header      [rest] raw little-endian tensor bytes

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of
the header) and holds "__metadata__" (string -> string). Our checkpoints store the model config as a JSON object in
__metadata__["config"]. The `safetensors` package reads the same files (safetensors.torch.load_file); this parser
exists so that the reference has one dependency fewer.
"""
import json
import struct

import torch

_DTYPES = {"F32": torch.float32, "I32": torch.int32, "F64": torch.float64, "I64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def load(path):
    """Returns (tensors: dict name -> CPU tensor, metadata: dict)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, e in header.items():
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name}: dtype {e['dtype']} not supported here")
        a, b = e["data_offsets"]
        dt = _DTYPES[e["dtype"]]
        t = torch.frombuffer(bytearray(body[a:b]), dtype=dt) if b > a else torch.empty(0, dtype=dt)
        tensors[name] = t.reshape(e["shape"]).clone()
    return tensors, meta


def save(path, tensors, metadata=None):
    header = {"__metadata__": dict(metadata or {})}
    blobs, off = [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_config(meta):
    """The model config (CoEConfig key -> string) stored in a checkpoint's metadata."""
    if "config" not in meta:
        raise ValueError("checkpoint metadata has no 'config' (not a ClusterMoE checkpoint?)")
    return json.loads(meta["config"])
