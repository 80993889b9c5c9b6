"""OpenAI's CLIP weights in Hugging Face's layout: a folder or a hub id, read offline as OpenAI's state dict.

What: many labs hold OpenAI's CLIP as a Hugging Face folder (what `CLIPModel.save_pretrained` writes:
config.json plus model.safetensors or pytorch_model.bin), e.g. `openai/clip-vit-base-patch16` (ViT-B/16) or
`openai/clip-vit-large-patch14` (ViT-L/14) in the hub cache. They are OpenAI's weights under other names: q, k
and v as three projections, the two projections stored as nn.Linear (transposed), layer norms and MLP renamed.
openai_state_dict maps them back one to one, so clip_model.build_model loads them with strict=True and a run
computes what it computes on OpenAI's archive of the same weights.

Offline: a hub id is looked up in the hub cache only (hub_cache: huggingface_hub's own rule), in the
snapshot that refs/main names; nothing is ever downloaded.

Refused in one line that names the difference (check_architecture, check_sizes): a folder the vendored model
cannot compute exactly (an activation other than quick_gelu, another layer-norm epsilon, heads not 64 wide, a
text tower pooled elsewhere than at the largest token id, another model type) and a config.json whose sizes
disagree with its tensors.

This module imports no project file: clip_model.py reads a folder through it (read_hf_folder) and raises its
FolderError as CLIPLoadError. Reference: transformers' models/clip/modeling_clip.py (CLIPModel), whose tensor
names are mapped below.
"""
import json
import os
import re

import torch


class FolderError(ValueError):
    """A Hugging Face folder or hub id that cannot be read as OpenAI's CLIP (one-line message)."""


# ------------------------------------------------------------------------------------------------
# Where the folder is: a path, or a hub id in the hub cache (never downloaded)
# ------------------------------------------------------------------------------------------------

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")   # organisation/name, as on huggingface.co


def hub_cache() -> str:
    """huggingface_hub's rule: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def hub_snapshot(repo_id: str) -> str:
    """The folder of a downloaded hub model: <cache>/models--<org>--<name>/snapshots/<revision of refs/main>."""
    cache = hub_cache()
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    fetch = (f"nothing is downloaded here (offline): fetch it once where there is network (`hf download {repo_id}`, "
             f"huggingface_hub) or pass the folder of its files")
    if not os.path.isdir(repo):
        raise FolderError(f"Hugging Face model {repo_id} is not downloaded in the hub cache {cache} "
                          f"(HF_HUB_CACHE, else $HF_HOME/hub); {fetch}")
    ref = os.path.join(repo, "refs", "main")
    if not os.path.isfile(ref):
        raise FolderError(f"{repo} has no refs/main: pass the snapshot folder you mean (snapshots/<revision>) itself")
    with open(ref, encoding="utf-8", errors="replace") as f:
        revision = f.read(200).strip()
    folder = os.path.join(repo, "snapshots", revision)
    if not re.fullmatch(r"[\w.-]+", revision) or not os.path.isdir(folder):
        raise FolderError(f"{ref} names revision {revision[:60]!r}, which has no snapshot folder there: the download "
                          f"is incomplete; {fetch}")
    return folder


# ------------------------------------------------------------------------------------------------
# Reading the folder: config.json and its one weights file
# ------------------------------------------------------------------------------------------------

def read_config(folder: str) -> dict:
    """config.json of a CLIPModel folder, as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):   # a FIFO or a folder too: never opened
        raise FolderError(f"{folder} is a folder without config.json: pass a .pt file, or a Hugging Face CLIP folder "
                          f"(config.json and model.safetensors or pytorch_model.bin)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, OSError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FolderError(f"{path} cannot be read as JSON ({type(e).__name__}): download it again") from None
    if not isinstance(config, dict):
        raise FolderError(f"{path} holds a JSON {type(config).__name__}, not a model configuration: download it again")
    return config


def weights_file(folder: str) -> str:
    """model.safetensors (what transformers writes now), else pytorch_model.bin (what it wrote before v5)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if any(name.endswith(".index.json") for name in os.listdir(folder)):
        raise FolderError(f"{folder} holds its weights in shards (*.index.json), which are not read: save the model "
                          f"again as one file (CLIP ViT-L/14 is 1.7 GB)")
    raise FolderError(f"{folder} holds no model.safetensors or pytorch_model.bin (TensorFlow and Flax weights are not "
                      f"read): download the PyTorch weights too")


def read_safetensors(path: str) -> dict:
    """model.safetensors as CPU tensors. The format is data only (a JSON header of names, dtypes and offsets, then
    raw bytes); the safetensors package that reads it is optional, imported only for such files."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise FolderError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:   # safetensors_rust.SafetensorError, OSError: a truncated or foreign file
        raise FolderError(f"cannot read {path} ({type(e).__name__}): the file is corrupted or not safetensors; "
                          f"download it again") from None


# ------------------------------------------------------------------------------------------------
# Is it a model the vendored CLIP computes exactly? (config.json against OpenAI's architecture)
# ------------------------------------------------------------------------------------------------

# transformers' defaults (CLIPTextConfig, CLIPVisionConfig, CLIPConfig), for keys a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# model types whose folders look like CLIP's but compute something else
OTHER_MODELS = {"siglip": "a sigmoid-loss model whose text tower has no causal mask and pools the last token",
                "siglip2": "a sigmoid-loss model whose text tower has no causal mask and pools the last token",
                "chinese_clip": "a BERT text tower without a causal mask",
                "altclip": "an XLM-R text tower without a causal mask",
                "clipseg": "CLIP with a segmentation decoder",
                "owlvit": "CLIP with detection heads"}


def tower_configs(config: dict) -> tuple[dict, dict]:
    """(text, vision) settings of a CLIPModel config.json, with transformers' defaults where it is silent. The
    hub's early uploads also carry text_config_dict / vision_config_dict, which transformers lets override."""
    parts = [config.get(key) or {} for key in ("text_config", "text_config_dict", "vision_config", "vision_config_dict")]
    if not all(isinstance(part, dict) for part in parts):
        raise FolderError("its config.json holds text_config/vision_config that are not JSON objects")
    text, vision = {**TEXT_DEFAULTS, **parts[0], **parts[1]}, {**VISION_DEFAULTS, **parts[2], **parts[3]}
    for key in ("image_size", "patch_size"):   # transformers also accepts [h, w]; OpenAI's ViTs are square
        if isinstance(vision[key], (list, tuple)):
            if len(set(vision[key])) != 1:
                raise FolderError(f"its vision tower has a non-square {key} {vision[key]}: OpenAI's ViTs are square")
            vision[key] = vision[key][0]
    return text, vision


def check_architecture(config: dict, text: dict, vision: dict) -> None:
    """Refuse what the vendored model (OpenAI's architecture) would compute differently, naming the difference."""
    kind = config.get("model_type", "clip")
    if kind != "clip":
        raise FolderError(f"it holds a {kind!r} model ({OTHER_MODELS.get(kind, 'not CLIP')}), not CLIP (model_type "
                          f"'clip'): the vendored model is OpenAI's CLIP only")
    if config.get("architectures") and "CLIPModel" not in config["architectures"]:
        raise FolderError(f"it holds a {config['architectures'][0]}, not a CLIPModel with both towers")
    for tower, c in (("text", text), ("vision", vision)):
        if c["hidden_act"] != "quick_gelu":
            raise FolderError(f"its {tower} tower uses hidden_act {c['hidden_act']!r}, not OpenAI's quick_gelu: the "
                              f"vendored model would compute another function")
        if c["layer_norm_eps"] != 1e-5:
            raise FolderError(f"its {tower} tower uses layer_norm_eps {c['layer_norm_eps']}, OpenAI's CLIP 1e-5")
        if c["hidden_size"] % 64 or c["num_attention_heads"] != c["hidden_size"] // 64:
            raise FolderError(f"its {tower} tower has {c['num_attention_heads']} attention heads for width "
                              f"{c['hidden_size']}: OpenAI's layout (kept by the vendored model) has heads 64 wide")
        if c["intermediate_size"] != 4 * c["hidden_size"]:
            raise FolderError(f"its {tower} tower has an MLP of {c['intermediate_size']} for width {c['hidden_size']}: "
                              f"OpenAI's MLP is 4 times the width")
    if vision["num_channels"] != 3:
        raise FolderError(f"its vision tower takes {vision['num_channels']} channels, OpenAI's RGB 3")
    if vision["image_size"] % vision["patch_size"]:
        raise FolderError(f"its image_size {vision['image_size']} is not a multiple of its patch_size "
                          f"{vision['patch_size']}: OpenAI's ViTs tile the image exactly")
    eos, largest = text["eos_token_id"], text["vocab_size"] - 1
    if eos not in (2, largest):   # 2: transformers' legacy value, which pools at the largest id too
        raise FolderError(f"its text tower pools at token id {eos}, the vendored model at the largest id (OpenAI's "
                          f"EOT, {largest} here)")


def check_sizes(config: dict, text: dict, vision: dict, sd: dict) -> None:
    """config.json's sizes against the tensors' (OpenAI names): a folder whose two disagree is damaged or mixed."""
    def dim(name, i):
        return sd[name].shape[i] if name in sd and sd[name].dim() > i else None

    def blocks(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    grid = vision["image_size"] // vision["patch_size"]
    pairs = [("text_config.vocab_size", text["vocab_size"], dim("token_embedding.weight", 0)),
             ("text_config.hidden_size", text["hidden_size"], dim("ln_final.weight", 0)),
             ("text_config.max_position_embeddings", text["max_position_embeddings"], dim("positional_embedding", 0)),
             ("text_config.num_hidden_layers", text["num_hidden_layers"], blocks("transformer.resblocks.")),
             ("text_config.intermediate_size", text["intermediate_size"],
              dim("transformer.resblocks.0.mlp.c_fc.weight", 0)),
             ("vision_config.hidden_size", vision["hidden_size"], dim("visual.conv1.weight", 0)),
             ("vision_config.num_channels", vision["num_channels"], dim("visual.conv1.weight", 1)),
             ("vision_config.patch_size", vision["patch_size"], dim("visual.conv1.weight", 3)),
             ("vision_config.image_size / patch_size, as positions", grid ** 2 + 1,   # one per patch, + [CLS]
              dim("visual.positional_embedding", 0)),
             ("vision_config.num_hidden_layers", vision["num_hidden_layers"], blocks("visual.transformer.resblocks.")),
             ("vision_config.intermediate_size", vision["intermediate_size"],
              dim("visual.transformer.resblocks.0.mlp.c_fc.weight", 0)),
             ("projection_dim", config.get("projection_dim", 512), dim("text_projection", 1)),
             ("projection_dim", config.get("projection_dim", 512), dim("visual.proj", 1))]
    for key, said, found in pairs:
        if found is not None and said != found:
            raise FolderError(f"its config.json says {key} {said} but its tensors have {found}: the folder is damaged "
                              f"or mixes two models; download it again")


# ------------------------------------------------------------------------------------------------
# Hugging Face's names -> OpenAI's (transformers' CLIPModel -> clip_model.CLIP)
# ------------------------------------------------------------------------------------------------

WHOLE = {  # tensors outside the blocks, kept as they are
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",   # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
BLOCK = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
RESBLOCKS = {"text": "transformer.resblocks", "vision": "visual.transformer.resblocks"}
IN_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")   # stacked in this order in OpenAI's in_proj


def openai_names(hf: dict) -> dict:
    """transformers' CLIPModel tensors under OpenAI's names: q, k, v stacked into in_proj_weight (3D, D) and
    in_proj_bias (3D,), nn.Linear projections (E, D) transposed to OpenAI's (D, E) matrices, the rest renamed."""
    sd, qkv = {}, {}
    for name, t in hf.items():
        block = BLOCK.fullmatch(name)
        if name.endswith(".position_ids"):   # an index buffer (arange) that older files saved; not a weight
            continue
        if name in WHOLE:
            sd[WHOLE[name]] = t
        elif name in TRANSPOSED:
            sd[TRANSPOSED[name]] = t.t().contiguous()
        elif block and block[3] in IN_BLOCK:
            sd[f"{RESBLOCKS[block[1]]}.{block[2]}.{IN_BLOCK[block[3]]}.{block[4]}"] = t
        elif block and block[3] in QKV:
            qkv.setdefault(f"{RESBLOCKS[block[1]]}.{block[2]}.attn.in_proj_{block[4]}", {})[block[3]] = t
        else:
            raise FolderError(f"it holds a tensor {name!r} that OpenAI's CLIP has no place for (a projection bias, "
                              f"another model's head, a wrapper's prefix): it is not a plain CLIPModel")
    for name, parts in qkv.items():
        if len(parts) != 3:
            raise FolderError(f"it lacks the {', '.join(sorted(set(QKV) - set(parts)))} tensors of {name}")
        sd[name] = torch.cat([parts[p] for p in QKV])   # (3D, D) or (3D,)
    return sd


def openai_state_dict(tensors: dict, config: dict, folder: str) -> dict:
    """The tensors of a Hugging Face CLIP folder as OpenAI's state dict, after checking that the vendored model
    computes this model exactly (check_architecture) and that config.json and the tensors agree (check_sizes)."""
    try:
        text, vision = tower_configs(config)
        check_architecture(config, text, vision)
        sd = openai_names(tensors)
        check_sizes(config, text, vision, sd)
    except FolderError as e:
        raise FolderError(f"Hugging Face folder {folder}: {e}") from None
    except (TypeError, ZeroDivisionError) as e:   # "hidden_size": "768", "patch_size": 0, ...
        raise FolderError(f"Hugging Face folder {folder}: its config.json holds a setting of the wrong kind ({e})") from None
    return sd
