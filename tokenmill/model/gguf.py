"""GGUF files: metadata -> ModelConfig, the tensor table (tensors -> torch: gguf_tensors.py; vocabulary ->
Tokenizer: gguf_tokenizer.py). Torch-free: the API process reads a model's vocabulary from here.

The file is parsed here directly (header, key/value metadata, tensor table) rather than with
``gguf.GGUFReader``, which builds a numpy view per metadata item and takes seconds on a 49k-token
vocabulary; the ``gguf`` package still supplies the type tables and the block dequantizers.
Tensor data stays memory-mapped (copy-on-write) until it is dequantized or handed over raw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.config import ModelConfig
from tokenmill.model.gguf_tokenizer import tokenizer_from_gguf  # noqa: F401  (re-exported: the vocabulary)

GGUF_MAGIC = b"GGUF"
SUPPORTED_TENSOR_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class RawQuantTensor:
    """A weight left in its GGML block format, for a quantized linear layer to convert.

    ``data`` is uint8 with one row of raw blocks per output row: [out_features, in_features / block
    * bytes_per_block]. Rows are independent, so row permutations (the llama Q/K undo) apply to it.
    """

    ggml_type: int
    data: np.ndarray
    shape: tuple[int, int]  # (out_features, in_features)


@dataclass
class GGUFTensorInfo:
    """One entry of the tensor table: where its bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), e.g. (out_features, in_features)
    ggml_type: GGMLQuantizationType
    data: np.ndarray  # uint8 view of the file: [rows, bytes_per_row]


@dataclass
class GGUFFile:
    """Parsed GGUF: metadata key/values and the tensor table (data memory-mapped)."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Sequential little-endian reader over a byte buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise ValueError(f"unknown GGUF metadata value type {vtype}")
        item_type, count = self.unpack("I"), self.unpack("Q")
        if item_type in _NUMPY_DTYPES:  # numeric arrays in one read (token types, scores)
            dt = np.dtype(_NUMPY_DTYPES[item_type]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        return [self.value(item_type) for _ in range(count)]


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; ValueError if it is not GGUF v2/v3."""
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read GGUF file {path!r}: {e}") from e
    if len(mm) < 24 or bytes(mm[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (bad magic bytes)")
    cur = _Cursor(memoryview(mm))
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise ValueError(f"{path!r}: unsupported GGUF version {version} (supported: 2, 3)")
    try:
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("I"))
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
            table.append((name, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
    except struct.error as e:
        raise ValueError(f"{path!r}: truncated or corrupt GGUF header") from e
    align = metadata.get("general.alignment", 32)
    data_start = (cur.pos + align - 1) // align * align
    tensors = {name: _tensor_info(path, mm, data_start, name, shape, t, off) for name, shape, t, off in table}
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _tensor_info(path: str, mm: np.ndarray, data_start: int, name: str, shape: tuple[int, ...],
                 type_id: int, offset: int) -> GGUFTensorInfo:
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"{path!r}: tensor {name!r} has unknown GGML type {type_id}") from None
    if ggml_type not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(f"{path!r}: tensor {name!r} has unsupported type {ggml_type.name}; supported: "
                         f"{sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}")
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    row_bytes = cols // block * block_bytes
    start = data_start + offset
    if cols % block or start + rows * row_bytes > len(mm):
        raise ValueError(f"{path!r}: tensor {name!r} data is truncated or misaligned")
    return GGUFTensorInfo(name, shape, ggml_type, mm[start:start + rows * row_bytes].reshape(rows, row_bytes))


def model_config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """ModelConfig from GGUF metadata, parsed by the model class of ``general.architecture``;
    unsupported architectures raise ValueError."""
    from tokenmill.model.registry import model_class  # lazy: the model classes import this module's helpers

    arch = gf.metadata.get("general.architecture")
    try:
        cls = model_class(arch)
    except ValueError as e:
        raise ValueError(f"{gf.path!r}: {e}") from None
    return cls.config_from_gguf(gf, arch)


def gguf_config_fields(gf: GGUFFile, arch: str) -> dict[str, Any]:
    """The ModelConfig fields every family reads the same way from ``{arch}.*`` metadata keys."""
    md = gf.metadata
    if "rope_freqs.weight" in gf.tensors:
        raise ValueError(f"{gf.path!r}: per-dimension rope frequencies (rope_freqs.weight, Llama 3.1 style "
                         "rope scaling) are not supported")

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{gf.path!r}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    scaling = None
    if md.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif md.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{gf.path!r}: unsupported rope scaling {md[f'{arch}.rope.scaling.type']!r}")
    return dict(
        vocab_size=get("vocab_size", gf.tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors or "blk.0.attn_qkv.bias" in gf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_eos_token_ids(md),
    )


def gguf_eos_token_ids(md: dict[str, Any]) -> list[int]:
    """End-of-generation ids: eos, plus end-of-turn / end-of-message when the file names them."""
    ids = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(i for i in ids if i is not None))
