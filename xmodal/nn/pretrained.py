"""Pretrained Hugging Face encoders loaded from a local directory, for xmodal's net slots.

A small own dataset (a few hundred images) is too little to learn an image or text encoder from
scratch; these wrap a ``transformers`` backbone saved with ``save_pretrained`` so it can be frozen
(or partly or fully fine-tuned) under a freshly trained head:

- :class:`HFImageEncoder` for the captioner's ``model.encoder``: images ``[B, C, H, W]`` in
  ``[-1, 1]`` → the backbone's last hidden states projected to ``[B, N, d_model]`` tokens (ViT,
  CLIP vision, DINOv2, any ``AutoModel`` vision backbone; conv backbones' feature maps become one
  token per position; the vision tower of a dual encoder such as a full CLIP model);
- :class:`HFTextCondition` for the GAN's / VAE's ``model.condition_encoder``: ``batch["text"]``
  ids ``[B, T]`` → ``[B, cond_dim]``, with :meth:`HFTextCondition.encode` giving per-token features
  for ``model.fusion=cross_attention`` (BERT, CLIP text, any ``AutoModel`` text model). The ids
  must be the model's own: ``data.tokenizer`` loads the directory's ``tokenizer.json``
  (``data/tokenizer=hf_bert``), checked at config validation.

``transformers`` is an optional extra (``pip install 'xmodal[pretrained]'``), imported only when a
wrapper is built. Nothing is downloaded: the path must be a directory and ``from_pretrained`` gets
``local_files_only=True`` (a string that is not a directory would otherwise be read as a Hub id).
A bad path is a one-line ``ConfigError`` at config validation, through the ``slot_problems`` hook
that :func:`xmodal.tasks.config.check_slot` calls for any slot ``_target_`` defining it.

``freeze=True`` keeps the backbone's weights out of training: ``requires_grad_(False)``, eval mode
kept through ``train()`` calls (no dropout, BatchNorm statistics untouched), and its forward runs
without autograd; optimizers keep no state for it (AdamW skips parameters without gradients, and
the captioner leaves them out of its optimizer). ``train_last_n_layers=n`` then trains the last
``n`` blocks of the backbone's layer stack and what is registered after it (the final norm).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.nn.condition import Encoded, masked_mean

WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STACK_NAMES = ("layer", "layers", "blocks", "block", "h")
"""Attribute names of a transformer's block list (ViT ``layers``, BERT ``encoder.layer``, CLIP
``encoder.layers``, GPT-2 ``h``): where ``train_last_n_layers`` counts from."""
SUBWORD = "xmodal.tokenizers.subword.SubwordTokenizer"
INSTALL = "pip install 'xmodal[pretrained]'"


# ---------------------------------------------------------------- directory checks (no transformers)


def directory_problem(path: Any) -> str | None:
    """Why ``path`` is not a model directory written by ``save_pretrained`` (None: it is one)."""
    if not isinstance(path, str | os.PathLike) or not str(path):
        return "must name a directory written by save_pretrained"
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return "no such directory (save a model there with save_pretrained; nothing is downloaded)"
    if not (folder / "config.json").is_file():
        return "has no config.json (not a directory written by save_pretrained)"
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        return f"has no weights file ({' or '.join(WEIGHTS_FILES[::2])})"
    return None


def model_json(path: str | os.PathLike, tower: str) -> dict[str, Any]:
    """``config.json`` of the directory, or its ``vision_config`` / ``text_config`` part for a
    dual encoder (``tower``: ``vision`` or ``text``); ``{}`` when unreadable."""
    try:
        spec = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    sub = spec.get(f"{tower}_config") if isinstance(spec, dict) else None
    return sub if isinstance(sub, dict) else spec if isinstance(spec, dict) else {}


def _json_file(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def tokenizer_specials(path: str | os.PathLike) -> dict[str, str]:
    """The model tokenizer's special tokens as xmodal names them (``pad``, ``bos``, ``eos``,
    ``unk``), from ``tokenizer_config.json`` / ``special_tokens_map.json``: BOS is the ``bos_token``
    or else the ``cls_token`` (BERT's ``[CLS]``), EOS the ``eos_token`` or else the ``sep_token``."""
    folder = Path(path).expanduser()
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        for field, value in _json_file(folder / name).items():
            if isinstance(value, dict):
                value = value.get("content")
            if field.endswith("_token") and isinstance(value, str):
                found[field[: -len("_token")]] = value
    out = {"pad": found.get("pad"), "bos": found.get("bos") or found.get("cls")}
    out |= {"eos": found.get("eos") or found.get("sep"), "unk": found.get("unk")}
    return {k: v for k, v in out.items() if v is not None}


def _option_problems(cls: type, key: str, options: Mapping[str, Any]) -> list[str]:
    """Options ``cls.__init__`` does not take, or required ones missing (instantiate would raise)."""
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    names = list(params)
    out = [
        f"{key}.{option}: not an option of {cls.__name__} (options: {', '.join(names)})"
        for option in options
        if option not in params
    ]
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    out += [f"{key}.{name}: required by {cls.__name__} (got None)" for name in missing]
    return out


def _common_problems(cls: type, key: str, options: Mapping[str, Any], tower: str) -> list[str]:
    if importlib.util.find_spec("transformers") is None:
        return [f"{key}._target_: {cls.__name__} needs the transformers package: {INSTALL}"]
    out = _option_problems(cls, key, options)
    if out:
        return out
    why = directory_problem(options.get("path"))
    if why is not None:
        return [f"{key}.path: {why} (got {options.get('path')!r})"]
    spec = model_json(options["path"], tower)
    kind = (
        "text"
        if "vocab_size" in spec and "image_size" not in spec
        else "vision"
        if "image_size" in spec
        else None
    )
    if kind is not None and kind != tower:
        return [
            f"{key}.path: holds a {kind} model, {cls.__name__} needs a {tower} one (got {options['path']!r})"
        ]
    freeze, last = options.get("freeze", True), options.get("train_last_n_layers", 0)
    if not isinstance(freeze, bool):
        out.append(f"{key}.freeze: must be true or false (got {freeze!r})")
    layers = spec.get("num_hidden_layers")
    if not (isinstance(last, int) and not isinstance(last, bool) and last >= 0):
        out.append(f"{key}.train_last_n_layers: must be an integer >= 0 (got {last!r})")
    elif isinstance(layers, int) and last > layers:
        out.append(f"{key}.train_last_n_layers: the model has {layers} layers (got {last!r})")
    elif last > 0 and freeze is False:
        out.append(f"{key}.train_last_n_layers: applies to a frozen backbone (freeze=true) (got {last!r})")
    return out


# ---------------------------------------------------------------- loading (transformers)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[Any]:
    """transformers, with its per-load progress bar and info lines off (restored after)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"xmodal.nn.pretrained needs the transformers package: {INSTALL}") from err
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_backbone(path: str | os.PathLike, tower: str) -> nn.Module:
    """The ``AutoModel`` saved in directory ``path``, in float32, offline; for a dual encoder (a
    full CLIP / SigLIP model) its ``vision_model`` or ``text_model`` tower (``tower``)."""
    why = directory_problem(path)
    if why is not None:
        raise FileNotFoundError(f"{path}: {why}")
    folder = str(Path(path).expanduser().resolve())
    with _quiet_transformers() as transformers:
        model, info = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    # Keys the weights lack were initialised at random: say so (a pooler head is never read).
    missing = [k for k in info.get("missing_keys", ()) if not str(k).startswith("pooler.")]
    if missing:
        warnings.warn(
            f"{folder}: {len(missing)} weights of the model are not in the saved file and start "
            f"random (first: {sorted(missing)[:3]})",
            stacklevel=3,
        )
    other = "text_model" if tower == "vision" else "vision_model"
    if hasattr(model, f"{tower}_model") and hasattr(model, other):  # a dual encoder: one tower
        model = getattr(model, f"{tower}_model")
    return model.float()


def layer_stack(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's block list: the longest ``ModuleList`` named as in :data:`STACK_NAMES`."""
    stacks = [
        m
        for name, m in backbone.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in STACK_NAMES
    ]
    return max(stacks, key=len, default=None)


class PretrainedBackbone(nn.Module):
    """A loaded backbone with its freezing policy; subclasses add the input mapping and the head."""

    tower = "vision"

    def __init__(self, path: str, freeze: bool = True, train_last_n_layers: int = 0):
        super().__init__()
        self.path = str(path)
        self.freeze = freeze
        self.backbone = load_backbone(path, self.tower)
        self.backbone.requires_grad_(not freeze)
        if freeze and train_last_n_layers > 0:
            self._unfreeze_last(train_last_n_layers)
        self.frozen_modules: list[nn.Module] = []
        self.trains_backbone = not freeze

    def _unfreeze_last(self, n: int) -> None:
        stack = layer_stack(self.backbone)
        if stack is None or n > len(stack):
            raise ValueError(
                f"{self.path}: train_last_n_layers={n} but the backbone has "
                f"{0 if stack is None else len(stack)} layers in a stack named {STACK_NAMES}"
            )
        for block in stack[len(stack) - n :]:
            block.requires_grad_(True)
        last = {id(p) for p in stack[-1].parameters()}
        seen_last = False
        for p in self.backbone.parameters():  # registration order: what comes after the stack
            if id(p) in last:
                seen_last = True
            elif seen_last:
                p.requires_grad_(True)

    def _settle(self, probe: dict[str, torch.Tensor]) -> None:
        """Freeze trainable parameters the features never read (a pooler head: DDP would wait for
        their gradients), found by one backward on ``probe``; then fix which modules stay in eval."""
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        if trainable:
            self.backbone.eval()
            with torch.enable_grad():
                self.backbone_features(**probe).float().sum().backward()
            for p in trainable:
                if p.grad is None:
                    p.requires_grad_(False)
                p.grad = None
        self.trains_backbone = any(p.requires_grad for p in self.backbone.parameters())
        # Modules with weights, all frozen, stay in eval (their dropout children with them).
        self.frozen_modules = [
            m
            for m in self.backbone.modules()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
        ]
        self.train(self.training)

    def backbone_features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (``[B, N, H]``, or ``[B, H, h, w]`` for a conv map)."""
        return self.backbone(**inputs).last_hidden_state

    def train(self, mode: bool = True) -> PretrainedBackbone:
        """``mode`` for this module, but frozen parts stay in eval (no dropout, fixed norm statistics)."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def run_backbone(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Last hidden states; a frozen backbone runs without autograd (no activations kept)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_backbone):
            return self.backbone_features(**inputs)


def _hidden_size(config: Any) -> int | None:
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    sizes = getattr(config, "hidden_sizes", None)  # conv backbones (ResNet, ConvNeXt)
    return int(sizes[-1]) if isinstance(sizes, list | tuple) and sizes else None


def _image_size(config: Any, processor: Mapping[str, Any]) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, list | tuple) and size:
        size = size[0]
    if isinstance(size, int):
        return size
    for field in ("crop_size", "size"):
        value = processor.get(field)
        if isinstance(value, dict):
            value = value.get("height", value.get("shortest_edge"))
        if isinstance(value, int):
            return value
    return None


class HFImageEncoder(PretrainedBackbone):
    """A pretrained vision backbone as the captioner's encoder: images → ``[B, N, d_model]``.

    Our ``[-1, 1]`` images become what the model was trained on: pixels to ``[0, 1]``, grey
    repeated to RGB, resized (bilinear, antialiased when shrinking) to ``image_size`` (given, else
    the model config's ``image_size``, else the ``preprocessor_config.json`` crop/size), then
    normalised by the ``image_mean`` / ``image_std`` of ``preprocessor_config.json`` when the
    directory has one, else CLIP's statistics for a ``clip`` model type and ImageNet's for any other
    (:attr:`normalization` says which). The last hidden states (a conv map's positions as tokens)
    go through LayerNorm + Linear to ``d_model``.

    ``path``: the ``save_pretrained`` directory; ``freeze``: keep the backbone fixed;
    ``train_last_n_layers``: with ``freeze``, train the last n blocks and the final norm.
    """

    tower = "vision"

    def __init__(
        self,
        path: str,
        d_model: int,
        freeze: bool = True,
        train_last_n_layers: int = 0,
        image_size: int | None = None,
    ):
        super().__init__(path, freeze, train_last_n_layers)
        config = self.backbone.config
        processor = _json_file(Path(path).expanduser() / "preprocessor_config.json")
        size = image_size or _image_size(config, processor)
        if size is None:
            raise ValueError(f"{path}: the model config has no image_size; give image_size")
        self.image_size = int(size)
        self.channels = int(getattr(config, "num_channels", 3))
        mean, std, self.normalization = self._statistics(config, processor)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        probe = {"pixel_values": torch.zeros(1, self.channels, self.image_size, self.image_size)}
        hidden = _hidden_size(config)
        if hidden is None:
            with torch.no_grad():
                hidden = int(self.tokens(self.backbone_features(**probe)).shape[-1])
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, d_model)
        self._settle(probe)

    def _statistics(self, config: Any, processor: Mapping[str, Any]) -> tuple[list[float], list[float], str]:
        if processor.get("do_normalize") is False:
            return [0.0] * self.channels, [1.0] * self.channels, "none (preprocessor_config.json)"
        mean, std = processor.get("image_mean"), processor.get("image_std")
        if isinstance(mean, list | tuple) and isinstance(std, list | tuple):
            return self._per_channel(mean), self._per_channel(std), "preprocessor_config.json"
        if "clip" in str(getattr(config, "model_type", "")):
            return list(CLIP_MEAN), list(CLIP_STD), "CLIP defaults"
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet defaults"

    def _per_channel(self, values: Any) -> list[float]:
        values = [float(v) for v in values]
        return values * self.channels if len(values) == 1 else values[: self.channels]

    @staticmethod
    def tokens(hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states as ``[B, N, H]``: a conv map ``[B, H, h, w]`` gives one token per position."""
        return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` → ``[B, channels, S, S]`` in the model's units."""
        if images.shape[1] != self.channels:
            if images.shape[1] != 1:
                raise ValueError(
                    f"{self.path}: the model reads {self.channels}-channel images, got {images.shape[1]}"
                )
            images = images.expand(-1, self.channels, -1, -1)  # grey → RGB
        x = (images + 1.0) * 0.5  # [B, C, H, W] in [0, 1]
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            shrink = x.shape[-1] > self.image_size
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.run_backbone(pixel_values=self.pixel_values(images))
        return self.proj(self.norm(self.tokens(hidden)))  # [B, N, d_model]

    @classmethod
    def slot_problems(cls, key: str, options: Mapping[str, Any], cfg: Any) -> list[str]:
        """One line per problem of this slot, checked at config validation (no model is loaded)."""
        out = _common_problems(cls, key, options, "vision")
        if out:
            return out
        model = cfg.get("model", {}) if cfg is not None else {}
        task = model.get("task")
        if task in ("gan", "vae", "translation"):
            return [
                f"{key}._target_: {cls.__name__} is a captioner's encoder (images → tokens) (got {task!r})"
            ]
        source = model.get("source")
        modality = dict(cfg.data.get("roles") or {}).get(source, source) if source is not None else None
        if modality not in (None, "image"):
            out.append(
                f"{key}._target_: {cls.__name__} reads images, model.source is {modality} (got {source!r})"
            )
        size = options.get("image_size")
        if size is not None and not (isinstance(size, int) and size >= 1):
            out.append(f"{key}.image_size: must be a positive integer or null (got {size!r})")
        return out


class HFTextCondition(PretrainedBackbone):
    """A pretrained text model as a condition encoder: ``batch[role]`` ids ``[B, T]`` → ``[B, cond_dim]``.

    The batch's ids come from ``data.tokenizer``, which must load the directory's own
    ``tokenizer.json`` with the model's special tokens (``data/tokenizer=hf_bert``; checked at
    config validation), so each id is the one the model was trained on; xmodal frames them BOS …
    EOS, which with BERT's names is its own ``[CLS] … [SEP]``. Padding is ``batch[role + "_mask"]``
    (else the tokenizer's pad id). The last hidden states go through LayerNorm, then ``encode``
    projects every token to ``cond_dim`` (for attention fusions) and the pooled vector is the
    projection of their masked mean, as the built-in TextCondition pools.
    """

    tower = "text"

    def __init__(
        self,
        path: str,
        cond_dim: int,
        role: str = "text",
        freeze: bool = True,
        train_last_n_layers: int = 0,
    ):
        super().__init__(path, freeze, train_last_n_layers)
        self.role = role
        config = self.backbone.config
        self.vocab_size = int(config.vocab_size)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(Path(path).expanduser() / "tokenizer.json"))
        pad = tokenizer_specials(path).get("pad")
        pad_id = vocab.token_to_id(pad) if pad is not None else None
        self.pad_id = int(pad_id if pad_id is not None else getattr(config, "pad_token_id", None) or 0)
        hidden = int(config.hidden_size)
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, cond_dim)
        self.ids_checked = False
        ids = torch.tensor([[self.pad_id, self.pad_id]])  # [1, 2]
        self._settle({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised last hidden states ``[B, T, H]`` and the real-token mask ``[B, T]``."""
        ids = batch[self.role]  # [B, T]
        mask = batch.get(f"{self.role}_mask")
        real = mask.bool() if mask is not None else ids != self.pad_id  # [B, T]
        if not self.ids_checked:  # once: an id past the vocabulary is the wrong tokenizer
            top = int(ids.max())
            if top >= self.vocab_size:
                raise ValueError(
                    f"{self.role} ids reach {top} but {self.path} has {self.vocab_size} tokens: "
                    f"data.tokenizer must load {self.path}/tokenizer.json (data/tokenizer=hf_bert)"
                )
            self.ids_checked = True
        hidden = self.run_backbone(input_ids=ids, attention_mask=real.long())  # [B, T, H]
        return self.norm(hidden), real

    def encode(self, batch: dict[str, Any]) -> Encoded:
        x, real = self.features(batch)
        # Pooled as forward pools (mean, then proj), so both views agree.
        return Encoded(self.proj(masked_mean(x, real)), self.proj(x), real)  # [B, C], [B, T, C], [B, T]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        x, real = self.features(batch)
        return self.proj(masked_mean(x, real))  # [B, C]

    @classmethod
    def slot_problems(cls, key: str, options: Mapping[str, Any], cfg: Any) -> list[str]:
        """One line per problem: the directory, and that ``data.tokenizer`` gives the model's ids."""
        out = _common_problems(cls, key, options, "text")
        if out:
            return out
        folder = Path(options["path"]).expanduser()
        vocab_file = folder / "tokenizer.json"
        if not vocab_file.is_file():
            return [
                f"{key}.path: has no tokenizer.json (save the model's fast tokenizer there too: "
                f"AutoTokenizer.from_pretrained(...).save_pretrained(dir)) (got {options['path']!r})"
            ]
        if cfg is None:
            return out
        role = options.get("role", "text")
        names = _condition_names(cfg.model.get("condition", "none"))
        if role not in names:
            out.append(f"{key}.role: must be a role of model.condition {names} (got {role!r})")
        spec = cfg.data.get("tokenizer") or {}  # a DictConfig resolves interpolations on access
        given = spec.get("path")
        same = spec.get("_target_") == SUBWORD and isinstance(given, str)
        if not (same and _same_file(Path(given).expanduser(), vocab_file)):
            shown = {k: spec.get(k) for k in ("_target_", "path")}
            out.append(
                f"data.tokenizer: must load {key}'s own tokenizer {str(vocab_file)!r} so the caption "
                f"ids are the model's: data/tokenizer=hf_bert (got {shown})"
            )
            return out
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(vocab_file))
        except Exception as err:  # the library raises its own exception types for a bad file
            return [*out, f"{key}.path: its tokenizer.json does not load ({err}) (got {options['path']!r})"]
        wanted = tokenizer_specials(folder)
        defaults = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
        for name, default in defaults.items():
            token = spec.get(f"{name}_token", default)
            if vocab.token_to_id(str(token)) is None:
                hint = f" (the model's: {wanted[name]!r})" if name in wanted else ""
                out.append(
                    f"data.tokenizer.{name}_token: not a token of {str(vocab_file)!r}, so its id would be "
                    f"past the model's vocabulary{hint} (got {token!r})"
                )
        positions = model_json(folder, "text").get("max_position_embeddings")
        max_len = cfg.data.get("max_text_len")
        if isinstance(positions, int) and isinstance(max_len, int) and max_len > positions:
            out.append(
                f"data.max_text_len: {key} reads at most {positions} tokens (max_position_embeddings) "
                f"(got {max_len})"
            )
        return out


def _condition_names(condition: Any) -> list[str]:
    """``model.condition`` (a name or a list of names) as a list, ``none`` left out."""
    names = [condition] if isinstance(condition, str) else list(condition or ())
    return [str(name) for name in names if name != "none"]


def _same_file(a: Path, b: Path) -> bool:
    """The same tokenizer file: the same path, or the same bytes (a copy)."""
    try:
        return a.resolve() == b.resolve() or a.read_bytes() == b.read_bytes()
    except OSError:
        return False
