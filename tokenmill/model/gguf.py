"""GGUF files: metadata -> ModelConfig, tensors -> Hugging Face names, vocabulary -> Tokenizer.

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
import tokenizers
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from tokenmill.config import ModelConfig
from tokenmill.model.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TENSOR_TYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"))

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
    """ModelConfig from GGUF metadata (``{arch}.*`` keys); unsupported architectures raise ValueError."""
    md = gf.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{gf.path!r}: unsupported architecture {arch!r}; supported: {SUPPORTED_GGUF_ARCHITECTURES}")
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
    return ModelConfig(
        architecture=arch,
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
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_eos_token_ids(md),
    )


def gguf_eos_token_ids(md: dict[str, Any]) -> list[int]:
    """End-of-generation ids: eos, plus end-of-turn / end-of-message when the file names them."""
    ids = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(i for i in ids if i is not None))


_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face parameter name of a GGUF tensor name; ValueError for names we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def unpermute_rows(a: np.ndarray | torch.Tensor, n_head: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's Q/K row order (rotary halves interleaved per head) along dim 0.

    llama.cpp stores, per head, rows [0, d/2, 1, d/2+1, ...] of the HF layout; rows here are
    [n_head * head_dim, ...] and each is moved whole, so raw quant blocks permute the same way.
    """
    rows = a.shape[0]
    half = rows // n_head // 2
    # [n_head, half, 2, ...] -> [n_head, 2, half, ...]: GGUF row h*d + 2i + j is HF row h*d + j*half + i
    w = a.reshape(n_head, half, 2, *a.shape[1:])
    w = w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)
    return w.reshape(a.shape)


def dequantize_tensor(info: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Dense tensor of ``info`` in ``dtype`` (shape ``info.shape``)."""
    t = info.ggml_type
    raw = torch.from_numpy(info.data)  # [rows, bytes_per_row] uint8
    if t == GGMLQuantizationType.F32:
        out = raw.view(torch.float32)
    elif t == GGMLQuantizationType.F16:
        out = raw.view(torch.float16)
    elif t == GGMLQuantizationType.BF16:
        out = raw.view(torch.bfloat16)
    elif t in _TORCH_DEQUANT:
        out = _TORCH_DEQUANT[t](raw)
    else:  # k-quants: the gguf package's numpy reference dequantizer
        out = torch.from_numpy(dequantize(info.data, t))
    return out.reshape(info.shape).to(dtype)


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte ``start`` of each block, as float32: [rows, n_blocks, 1]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 34 bytes: f16 scale d, 32 x int8 q; x = d * q
    blocks = raw.reshape(raw.shape[0], -1, 34)
    return _f16_field(blocks, 0) * blocks[..., 2:].contiguous().view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # 16 packed bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31
    return torch.cat([qs & 0xF, qs >> 4], dim=-1).float()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 18 bytes: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    blocks = raw.reshape(raw.shape[0], -1, 18)
    return _f16_field(blocks, 0) * (_nibbles(blocks[..., 2:]) - 8)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    # block of 20 bytes: f16 d, f16 min m, 16 bytes of nibbles; x = d * q + m
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return _f16_field(blocks, 0) * _nibbles(blocks[..., 4:]) + _f16_field(blocks, 2)


# The common simple formats run as torch ops (several times faster than the numpy reference).
_TORCH_DEQUANT = {GGMLQuantizationType.Q8_0: _dequant_q8_0, GGMLQuantizationType.Q4_0: _dequant_q4_0,
                  GGMLQuantizationType.Q4_1: _dequant_q4_1}


def load_gguf_tensors(gf: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32,
                      keep_quantized: frozenset[int] = frozenset()) -> dict[str, torch.Tensor | RawQuantTensor]:
    """All tensors under HF names, dequantized to ``dtype`` except 2-D weights whose GGML type is in
    ``keep_quantized`` (returned as RawQuantTensor). Llama Q/K rows are put back in HF order."""
    out: dict[str, torch.Tensor | RawQuantTensor] = {}
    for name, info in gf.tensors.items():
        hf_name = hf_tensor_name(name)
        n_head = _permute_heads(config, name)
        if len(info.shape) == 2 and int(info.ggml_type) in keep_quantized:
            data = info.data if n_head is None else unpermute_rows(info.data, n_head)
            out[hf_name] = RawQuantTensor(int(info.ggml_type), np.ascontiguousarray(data), info.shape)
            continue
        tensor = dequantize_tensor(info, dtype)
        out[hf_name] = tensor if n_head is None else unpermute_rows(tensor, n_head).contiguous()
    return out


def _permute_heads(config: ModelConfig, gguf_name: str) -> int | None:
    """Head count to undo the Q/K row permutation with, or None (qwen2 keeps the HF order)."""
    if config.architecture != "llama":
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


# Pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (the same regexes the models' own
# tokenizer.json files use). "smollm" and plain GPT-2 use ByteLevel's built-in GPT-2 regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` value (GPT-2's regex when unknown)."""
    if pre in ("llama-bpe", "llama3", "qwen2"):
        pattern = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # SmolLM splits every digit on its own before the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def tokenizer_from_gguf(gf: GGUFFile) -> Tokenizer:
    """Rebuild the model's byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata."""
    md = gf.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{gf.path!r}: unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2' byte-level BPE)")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = md.get("tokenizer.ggml.pre", "default")
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in ("llama-bpe", "llama3"))
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    # token_type 3 = control (special), 4 = user-defined (matched whole in text, not special)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 4])

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, md["tokenizer.ggml.bos_token_id"])])
    return Tokenizer(backend, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
                     pad_token=token("padding"), eos_token_ids=gguf_eos_token_ids(md),
                     chat_template=md.get("tokenizer.chat_template"))
