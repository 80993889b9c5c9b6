"""CLIP (ViT) model, checkpoint loader and BPE tokenizer, vendored for prompt tuning.

What: OpenAI's CLIP image/text towers with OpenAI's parameter names, so an official checkpoint
(`ViT-B-16.pt`, a TorchScript archive, or a plain state dict) loads with `strict=True`, plus the
byte-level BPE tokenizer giving OpenAI's token ids. The same weights as a Hugging Face folder or hub id
(`openai/clip-vit-base-patch16`, read offline from the hub cache) are mapped to OpenAI's names by hf_weights.py.

Source: re-written from the architecture of openai/CLIP (commit d05afc43, MIT licence,
Copyright (c) 2021 OpenAI); the BPE vocabulary in assets/ is OpenAI's file as shipped in the
MIT-licensed open_clip_torch wheel (see assets/README.md). Local changes are marked "changed:":
  - changed: prompts are explicit forward arguments (shallow visual prompts, per-block deep
    prompts for both towers) instead of a `design_details` dict switching block classes;
  - changed: attention runs batch-first through `F.scaled_dot_product_attention` using the
    checkpoint's `attn.in_proj_*` / `attn.out_proj` tensors (same maths, fused kernel);
  - changed: the text tower stops at the longest EOT of the batch. It is causal, so tokens after
    the EOT never influence the EOT feature: the truncated pass computes the same function (equal up
    to float rounding, not bit for bit: products of other shapes sum in another order) 77/len times cheaper;
  - changed: weights are kept at the checkpoint's values but held in fp32; on GPU the training
    scripts use autocast instead of OpenAI's fp16 conversion (docs/differences.md #1).

References: Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021. DPC paper §3.1: f(.) = `encode_image`, g(.) = `encode_text*`.

Usage:
    model = load("ViT-B/16")                     # ~/.cache/clip/ViT-B-16.pt, or a file path
    model = load("openai/clip-vit-base-patch16") # the same weights in the Hugging Face hub cache, or its folder
    tokens = tokenize(["a photo of a dog."])     # (1, 77) int32, OpenAI's ids
    img_feat, txt_feat = model.encode_image(x), model.encode_text(tokens)
    python clip_model.py --download ViT-B/16     # fetch + SHA-256 check (needs network)
"""
import argparse
import collections
import gzip
import hashlib
import html
import io
import math
import os
import pickle
import shutil
import stat
import sys
import urllib.request
import zipfile
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

import hf_weights

# Shape letters: B images, C class prompts, T text tokens (<= 77), N image tokens (grid² + 1),
# M prompt tokens, D width of a tower, E joint embedding width.

# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
MODELS = {  # name -> (file name in ~/.cache/clip, SHA-256 of the file = path segment of its URL)
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt",
                       "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}
CACHE_DIR = os.path.expanduser("~/.cache/clip")


class CLIPLoadError(RuntimeError):
    """A CLIP checkpoint is missing, unreadable or not a supported architecture (one-line message)."""


def model_url(name: str) -> str:
    file, sha = MODELS[name]
    return _URL.format(sha=sha, file=file)


def resolve_path(name_or_path: str) -> str:
    """Map a model name to OpenAI's cache layout (~/.cache/clip/ViT-B-16.pt) and a Hugging Face hub id to its
    snapshot in the hub cache (hf_weights.hub_snapshot: offline, never downloaded); keep a path (a file, or a
    Hugging Face folder) as is."""
    if name_or_path in MODELS:
        path = os.path.join(CACHE_DIR, MODELS[name_or_path][0])
        if not os.path.exists(path):
            raise CLIPLoadError(
                f"CLIP weights {name_or_path} not found at {path}: download {model_url(name_or_path)} "
                f"there (e.g. `python clip_model.py --download {name_or_path}`) or pass a file path")
        check_regular_file(path)
        return path
    if os.path.isdir(name_or_path):
        return name_or_path   # a Hugging Face folder (read_hf_folder)
    if os.path.exists(name_or_path):
        check_regular_file(name_or_path)
        return name_or_path
    if name_or_path.startswith("RN"):
        raise CLIPLoadError(f"{name_or_path}: only ViT backbones are supported (use one of {list(MODELS)})")
    if hf_weights.HUB_ID.fullmatch(name_or_path) and not name_or_path.startswith("ViT-"):
        try:
            return hf_weights.hub_snapshot(name_or_path)
        except hf_weights.FolderError as e:
            raise CLIPLoadError(str(e)) from None
    raise CLIPLoadError(f"CLIP weights '{name_or_path}' not found: give one of {list(MODELS)} "
                        f"(read from {CACHE_DIR}), the path of a .pt file or of a Hugging Face CLIP folder, or a hub "
                        f"id such as openai/clip-vit-base-patch16 already in the hub cache")


class ScriptObject:
    """Stands in for a class of a TorchScript archive (`__torch__.*`): its code is never compiled or
    run; the pickled attributes are kept as plain data (a module's parameters, buffers, submodules)."""

    def __setstate__(self, state):
        self.state = state


class TorchScriptUnpickler(pickle.Unpickler):
    """Reads the data.pkl of a TorchScript archive without torch.jit.load, which compiles and runs the
    archive's code (a `__setstate__` can write files). Only module objects (as ScriptObject), tensors
    and their storages are built; any other global is refused by name."""
    TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                      ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
                      ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if (module, name) in self.TENSOR_GLOBALS:
            return self.TENSOR_GLOBALS[(module, name)]
        if module == "torch" and name in self.STORAGE_DTYPES:
            return self.STORAGE_DTYPES[name]   # a storage type stands for its dtype
        raise pickle.UnpicklingError(f"{module}.{name}")

    STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                      "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                      "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                      "BoolStorage": torch.bool}

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid   # ('storage', torch.HalfStorage, '0', 'cuda:0', n)
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"persistent id {kind!r}")
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        if not raw or len(raw) != numel * dtype.itemsize:
            raise ValueError(f"storage {key} holds {len(raw)} bytes, not {numel} values of {dtype}")
        # not resizable: a tensor whose size or offset runs past the end of its storage cannot grow it
        untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def tensor_problem(t) -> str | None:
    """What makes a tensor read from a file unusable, or None. A pickle sets a tensor's size, stride and
    offset freely: a view past the end of its storage reads memory that is not its own, and a stride-0
    view of a few bytes can claim terabytes; both are refused, as are meta, sparse and quantized tensors."""
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}, not a tensor"
    if t.layout != torch.strided or t.is_meta or t.is_quantized or t.device.type != "cpu" or t.is_complex():
        return f"not a dense real CPU tensor ({t.layout}, {t.dtype}, {t.device})"
    if t.numel() == 0:
        return None
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    nbytes = t.untyped_storage().nbytes()
    if t.storage_offset() < 0 or min(t.stride(), default=0) < 0 or (last + 1) * t.element_size() > nbytes \
            or t.numel() * t.element_size() > nbytes:
        return f"a view of {tuple(t.shape)} that does not fit its storage of {nbytes} bytes"
    return None


def module_tensors(obj, prefix: str = "") -> dict:
    """The state dict of an unpickled TorchScript module: every tensor attribute, by dotted path."""
    out = {}
    for name, value in (obj.state.items() if isinstance(getattr(obj, "state", None), dict) else ()):
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            out.update(module_tensors(value, f"{prefix}{name}."))
    return out


def read_torchscript(path: str, archive: zipfile.ZipFile, prefix: str) -> dict:
    """OpenAI's TorchScript archive (`ViT-B-16.pt`) as a state dict, read as data (TorchScriptUnpickler)."""
    try:
        root = TorchScriptUnpickler(archive, prefix).load()
    except pickle.UnpicklingError as e:
        raise CLIPLoadError(
            f"refusing to read the TorchScript archive {path}: it pickles {e}, which OpenAI's archives do "
            f"not (only modules and tensors) and which could run code; if you trust the file, convert it once "
            f"with `python -c \"import torch; torch.save(torch.jit.load('{path}').state_dict(), 'clip.pt')\"` "
            f"and pass --clip clip.pt") from None
    except Exception as e:  # zip/pickle damage
        raise CLIPLoadError(f"cannot read CLIP checkpoint {path} ({type(e).__name__}): the file is "
                            f"corrupted or not a CLIP model; download it again") from None
    return module_tensors(root)


def check_regular_file(path: str) -> None:
    """Weights are read from regular files (or links to them) only: opening a FIFO blocks until a writer
    appears, i.e. forever, and a folder or device named like a checkpoint is a mistake to report."""
    if os.path.isfile(path):
        return
    mode = os.stat(path).st_mode
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise CLIPLoadError(f"CLIP weights {path} are {kind}, not a regular file: put the .pt file itself there")


def zip_problem(path: str) -> str | None:
    """What makes a zip archive (a torch.save file, OpenAI's TorchScript archive) unsafe to open, read from its
    central directory alone, before any entry is decompressed: torch.save and TorchScript store the entries
    that are read (data.pkl, constants.pkl, the tensor data) uncompressed, so such an entry compressed (a
    48 MB file that inflates to 3 GB) or declaring more bytes than the file holds means a file neither wrote.
    TorchScript's own code/ and .debug_pkl entries are compressed, and never read here (read_torchscript
    does not compile the archive's code). None for a sound archive, or a file that is no zip."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        return f"its zip directory cannot be read ({type(e).__name__})"
    declared = 0
    for entry in entries:
        if "/code/" in f"/{entry.filename}" or entry.filename.endswith(".debug_pkl"):   # never read
            continue
        if entry.compress_type != zipfile.ZIP_STORED:
            return (f"its entry {entry.filename[:60]!r} is compressed (method {entry.compress_type}), which torch.save "
                    f"and OpenAI's archives never do")
        if entry.file_size != entry.compress_size or entry.header_offset + entry.file_size > size:
            return f"its entry {entry.filename[:60]!r} declares {entry.file_size} bytes that the file does not hold"
        declared += entry.file_size
    if declared > size:
        return f"its entries declare {declared} bytes, more than the file's {size}"
    return None


def read_state_dict(path: str) -> dict:
    """Official files are TorchScript archives, read as data (read_torchscript: torch.jit.load would
    run the archive's code); ours and open_clip's are plain state dicts (torch.load, weights_only).
    Every tensor is checked to be a dense CPU tensor inside its storage (tensor_problem)."""
    check_regular_file(path)
    problem = zip_problem(path)
    if problem:
        raise CLIPLoadError(f"refusing to read CLIP weights {path}: {problem}; download the file again")
    obj = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())   # <archive name>/{data.pkl, constants.pkl, code/, data/}
            prefix = next((n[:-len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") <= 1
                           and n[:-len("data.pkl")] + "constants.pkl" in names), None)
            if prefix is not None:
                obj = read_torchscript(path, archive, prefix)
    if obj is None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors from a truncated or foreign file
            raise CLIPLoadError(f"cannot read CLIP checkpoint {path} ({type(e).__name__}): the file is "
                                f"corrupted or not a CLIP model; download it again") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CLIPLoadError(f"{path} does not hold a CLIP state dict")
    for name, value in obj.items():
        problem = tensor_problem(value)
        if problem:
            raise CLIPLoadError(f"{path} does not hold a CLIP state dict: {name} is {problem}")
    return obj


def read_hf_folder(folder: str) -> dict:
    """A Hugging Face CLIP folder as OpenAI's state dict (hf_weights: names mapped, architecture and sizes
    checked). model.safetensors is read by the safetensors package, pytorch_model.bin as our .pt files are."""
    try:
        config, path = hf_weights.read_config(folder), hf_weights.weights_file(folder)
        tensors = hf_weights.read_safetensors(path) if path.endswith(".safetensors") else read_state_dict(path)
        return hf_weights.openai_state_dict(tensors, config, folder)
    except hf_weights.FolderError as e:
        raise CLIPLoadError(str(e)) from None


def load(name_or_path: str = "ViT-B/16", device="cpu") -> "CLIP":
    """Load a CLIP model (frozen, eval mode, fp32 weights holding the checkpoint's values): OpenAI's name, a
    .pt file, a Hugging Face folder or hub id (see resolve_path)."""
    path = resolve_path(name_or_path)
    model = build_model(read_hf_folder(path) if os.path.isdir(path) else read_state_dict(path))
    return model.to(device)


def download(name: str, root: str = CACHE_DIR) -> str:
    """Fetch an official checkpoint into OpenAI's cache layout and check its SHA-256."""
    file, sha = MODELS[name]
    target = os.path.join(root, file)
    os.makedirs(root, exist_ok=True)
    if os.path.isfile(target) and file_sha256(target) == sha:
        return target
    tmp = target + ".part"
    with urllib.request.urlopen(model_url(name)) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
    if file_sha256(tmp) != sha:
        os.remove(tmp)
        raise CLIPLoadError(f"downloaded {file} does not match its SHA-256 {sha}; try again")
    os.replace(tmp, target)
    return target


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """Computes in fp32 and casts back, so half-precision inputs are normalised exactly as OpenAI's."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + Attn(ln_1(x)), then x + MLP(ln_2(x))."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.attn = nn.MultiheadAttention(d_model, n_head)  # holds in_proj_* and out_proj only
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(d_model, d_model * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(d_model * 4, d_model))
        self.ln_2 = LayerNorm(d_model)

    def attention(self, x, causal: bool):
        # changed: batch-first fused attention on the checkpoint's MultiheadAttention tensors.
        b, t, d = x.shape  # (B, T, D)
        q, k, v = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, D/heads)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.attn.out_proj(y)

    def forward(self, x, causal: bool = False):
        x = x + self.attention(self.ln_1(x), causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, deep_prompts=(), prompt_slot: slice = None):
        """x: (B, T, D). deep_prompts[i-1] (M, D) replaces the tokens at `prompt_slot` before block i.

        Block 0 sees the input-level prompts; blocks 1..len(deep_prompts) get fresh ones (MaPLe /
        IVLP "depth" = 1 + len(deep_prompts)); later blocks propagate what they receive.
        """
        assert len(deep_prompts) < self.layers, f"{len(deep_prompts)} deep prompts for {self.layers} blocks"
        for i, block in enumerate(self.resblocks):
            if 1 <= i <= len(deep_prompts):
                x = replace_tokens(x, deep_prompts[i - 1], prompt_slot)
            x = block(x, self.causal)
        return x


def replace_tokens(x, prompt, slot: slice):
    """x (B, T, D) with x[:, slot] replaced by prompt (M, D) broadcast over the batch (differentiably)."""
    start, stop, _ = slot.indices(x.shape[1])
    prompt = prompt.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, M, D)
    assert prompt.shape[1] == stop - start, f"prompt of {prompt.shape[1]} tokens for slot {start}:{stop}"
    return torch.cat([x[:, :start], prompt, x[:, stop:]], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, prompts=None, deep_prompts=()):
        """x (B, 3, H, W) -> (B, E). prompts (M, D): shallow visual prompts appended after the
        positional embedding and before ln_pre (MaPLe/IVLP); deep_prompts replace the LAST M tokens."""
        x = self.conv1(x.to(self.conv1.weight.dtype))           # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)                        # (B, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N, D)
        if prompts is not None:
            x = torch.cat([x, prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, N+M, D)
        x = self.ln_pre(x)
        m = 0 if prompts is None else prompts.shape[0]
        x = self.transformer(x, deep_prompts, slice(x.shape[1] - m, None))
        return self.ln_post(x[:, 0]) @ self.proj                # (B, E)


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (used for random models in tests, smoke runs and benchmarks)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = (width ** -0.5) * ((2 * layers) ** -0.5), width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    # -- image tower f(.) -------------------------------------------------------------------------
    def encode_image(self, image, prompts=None, deep_prompts=()):
        return self.visual(image.to(self.dtype), prompts, deep_prompts)

    # -- text tower g(.) --------------------------------------------------------------------------
    def token_embeddings(self, tokens):
        """(C, 77) token ids -> (C, 77, D) input embeddings (what prompt learners edit)."""
        return self.token_embedding(tokens.long()).to(self.dtype)

    def encode_text(self, tokens):
        """Plain CLIP text features (C, E) of tokenized strings."""
        return self.encode_text_embeddings(self.token_embeddings(tokens), tokens)

    def encode_text_embeddings(self, x, tokens, deep_prompts=(), truncate: bool = True, length: int = None):
        """x (C, 77, D) prompt embeddings, tokens (C, 77) ids (for EOT pooling) -> (C, E).

        deep_prompts[i-1] (M, D) replaces positions 1..M before text block i (MaPLe/IVLP). `length`: the
        longest EOT position + 1 when the caller knows it (else read from tokens, a wait on a GPU).
        """
        eot = tokens.argmax(dim=-1)  # EOT id 49407 is the largest id in every row
        if truncate:  # changed: causal attention makes everything after the longest EOT dead weight
            x = x[:, : int(eot.max()) + 1 if length is None else length]   # (C, T, D)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        m = deep_prompts[0].shape[0] if len(deep_prompts) else 0
        x = self.transformer(x, deep_prompts, slice(1, 1 + m))
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (C, E)

    def forward(self, image, text):
        """Zero-shot logits as OpenAI's forward: (B, C) and its transpose; softmax over C is Eq. (1), s = 1/τ."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


# ------------------------------------------------------------------------------------------------
# Building from a state dict (the checkpoint is the config)
# ------------------------------------------------------------------------------------------------

def architecture(sd: dict) -> dict:
    """Infer every constructor argument of CLIP from the tensors of a state dict."""
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1") or k.startswith("visual.attnpool") for k in sd):
            raise CLIPLoadError("this is a ResNet CLIP checkpoint: only ViT backbones are supported")
        raise CLIPLoadError("not a CLIP ViT state dict (no 'visual.proj' tensor)")
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd),
        vision_width=sd["visual.conv1.weight"].shape[0],
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=text_width,
        transformer_heads=text_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}),
    )


def build_model(state_dict: dict) -> CLIP:
    """CLIP with the checkpoint's values in fp32, frozen and in eval mode (CLIP is never trained here)."""
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    with torch.device("meta"):  # skip the random init: every tensor comes from the checkpoint
        model = CLIP(**architecture(sd))
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:   # missing, unexpected or misshapen tensors
        raise CLIPLoadError(f"not a CLIP ViT state dict of a known layout: {str(e).splitlines()[-1].strip()}") from None
    return model.requires_grad_(False).eval()


ARCHS = {  # constructor arguments of the official ViTs and of a tiny one for tests
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                     transformer_heads=8, transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                     transformer_heads=8, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                     transformer_heads=12, transformer_layers=12),
    # 12 blocks so every learner's depth-9 prompts fit; widths of 128 give 2 heads per tower. (With 10 blocks,
    # seed 0 sends every synthetic image to one class: a quarter of the tests' runs scored 0 % on base or new.)
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=12, vision_width=128,
                 vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=128,
                 transformer_heads=2, transformer_layers=12),
}


_TINY = {}   # seed -> (the 'tiny' CLIP, torch's RNG state after its initialisation), built once per process


def random_clip(arch: str = "tiny", seed: int = 0) -> CLIP:
    """A randomly initialised CLIP (frozen, eval) of a named architecture, for tests and benchmarks.
    'tiny' is initialised once per process and seed, then copied (a test suite builds hundreds: building one
    takes 0.18 s on a 2-core x86 CPU, copy.deepcopy 0.05 s, module_copy 0.016 s); the global RNG is left as
    the initialisation leaves it."""
    if arch not in ARCHS:
        raise CLIPLoadError(f"unknown architecture '{arch}': choose one of {list(ARCHS)}")
    torch.manual_seed(seed)
    if arch != "tiny":
        return CLIP(**ARCHS[arch]).requires_grad_(False).eval()
    if seed not in _TINY:
        _TINY[seed] = (CLIP(**ARCHS[arch]).requires_grad_(False).eval(), torch.get_rng_state())
    clip, rng_after = _TINY[seed]
    torch.set_rng_state(rng_after)
    return module_copy(clip)


def module_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares nothing it could change: parameters, buffers and tensor attributes
    cloned, every container it holds (hooks, parameter and module tables) copied, submodules copied the same
    way; what else a module of CLIP holds (ints, bools, strings) is immutable. copy.deepcopy gives the same,
    3x slower: it reduces each of the ~230 modules' ordered dicts through pickle's protocol."""
    new = object.__new__(type(module))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, (dict, set, list)) else v
             for k, v in vars(module).items()}
    state["_parameters"] = {k: None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad)
                            for k, p in module._parameters.items()}
    state["_buffers"] = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    state["_modules"] = {k: None if m is None else module_copy(m) for k, m in module._modules.items()}
    new.__dict__.update(state)
    return new


# ------------------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE, OpenAI's ids)
# ------------------------------------------------------------------------------------------------

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = 49406, 49407


@lru_cache()
def byte_to_unicode() -> dict:
    """Printable bytes map to themselves; the 68 others to chr(256 + n), so BPE never sees
    whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {b: table[b] for b in printable + others}  # vocab order: printable bytes first


class SimpleTokenizer:
    # the two special tokens, English contractions, letter runs, single digits, other symbol runs
    PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)

    def __init__(self, vocab_path: str = VOCAB_PATH):
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a header
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

    def bpe(self, token: str) -> str:
        """Merge the lowest-ranked adjacent pair, all its occurrences left to right, until none is known."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list:
        ids = []
        for piece in self.PATTERN.findall(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts, context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """[SOT] + BPE ids + [EOT], zero-padded to context_length: (len(texts), context_length) int32."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.zeros(len(texts), context_length, dtype=torch.int)
    for i, text in enumerate(texts):
        ids = [SOT] + tokenizer().encode(text) + [EOT]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length} "
                                   f"({len(ids)} tokens); shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [EOT]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fetch an official CLIP checkpoint into ~/.cache/clip.")
    parser.add_argument("--download", required=True, choices=list(MODELS), help="model name")
    name = parser.parse_args().download
    try:
        print(download(name))
    except (OSError, CLIPLoadError) as e:  # no network, a proxy, a full disk: one line, not a traceback
        sys.exit(f"error: download failed ({e}); fetch {model_url(name)} by hand into {CACHE_DIR}")
