"""ONNX export of a sentence-transformers folder, and encoding with ONNX Runtime.

The files go where sentence-transformers looks for them: ``onnx/model.onnx`` in the Transformer
module's folder (inputs ``input_ids``, ``attention_mask`` and, where the tokenizer makes them,
``token_type_ids``; output ``last_hidden_state``; batch and sequence axes dynamic) and
``onnx/model_qint8_avx512_vnni.onnx`` for int8, as its own export and quantization helpers name
them. ``SentenceTransformer(path, backend="onnx")`` loads them through optimum-onnx, whose releases
do not support transformers 5 yet; until then ``OnnxEncoder`` serves them: the transformer in ONNX
Runtime, the folder's own modules after it (pooling, Dense, Normalize) in torch, with its prompts.

The export traces the model with ``torch.onnx.export`` (TorchScript, opset 17), so it needs only
``onnx`` and ``onnxruntime``: ``pip install "embedtune[onnx]"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedtune.files import fsync_tree, remove_path, replace_folder

logger = logging.getLogger(__name__)


def runtime() -> Any:
    """onnxruntime, with onnx checked too: both come with the ``onnx`` extra. An ImportError of one
    line naming the extra when either is missing (the export command asks before any work)."""
    try:
        import onnx  # noqa: F401 (the export and the external-data layout need it)
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"ONNX export and inference need onnx and onnxruntime ({exc.name} is not installed): "
                          'pip install "embedtune[onnx]"', name=exc.name) from None
    return onnxruntime

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_qint8_avx512_vnni.onnx"  # sentence-transformers' name for its avx512_vnni dynamic int8
EXTERNAL_DATA = "model.onnx_data"  # optimum's name for the weights of a model past protobuf's 2 GiB
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # in optimum's order, each where the model takes it
OUTPUT = "last_hidden_state"
AXES = {0: "batch_size", 1: "sequence_length"}
OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # weights past this go to EXTERNAL_DATA (2 GiB, less room for the graph)
MIN_FP32_COSINE = 0.999  # an fp32 export below this is wrong, not imprecise (a sound one is within 1e-6)
LOW_INT8_COSINE = 0.95
# Lengths from one token to a few dozen in one padded batch: the export traces the masked path,
# and the agreement check covers padding.
PROBES = ["a", "how do I read a file line by line?",
          "Open() returns a file object; iterate over it to get one line at a time, with the newline kept. "
          "Use a with block so the file is closed even when the loop raises.", "sorting a list in place"]
QUERY_PROMPTS = ("query",)
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # sentence-transformers' encode_document looks in this order


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX, or its export does not agree with it; nothing was written."""


def transformer_dir(folder: str) -> str:
    """The Transformer module's folder, where ``onnx/`` goes (the folder itself, for most)."""
    modules_file = os.path.join(folder, "modules.json")
    if not os.path.isfile(modules_file):
        return folder  # a plain transformers folder: sentence-transformers adds mean pooling
    with open(modules_file, encoding="utf-8") as f:
        modules = json.load(f)
    first = modules[0] if isinstance(modules, list) and modules and isinstance(modules[0], dict) else {}
    return os.path.join(folder, str(first.get("path", "")))


def load_folder(folder: str, trust_remote_code: bool = False) -> Any:
    """The folder as a SentenceTransformer on the CPU, in float32 and eval mode, checked to start
    with a text Transformer (the part that goes to ONNX)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Transformer

    model = SentenceTransformer(folder, device="cpu", trust_remote_code=trust_remote_code)
    first = model[0]
    if not isinstance(first, Transformer):
        raise OnnxExportError(f"{folder}: its first module is {type(first).__name__}, not a Transformer; only a "
                              "Transformer goes to ONNX")
    if set(getattr(first, "modalities", ["text"])) - {"text"} or \
            getattr(first, "module_output_name", "token_embeddings") != "token_embeddings":
        raise OnnxExportError(f"{folder}: a {architecture(first.model)} that does not embed text tokens; the "
                              "ONNX export covers text embedding models")
    return model.to(torch.float32).eval()  # ONNX Runtime's CPU kernels are float32: a bf16 model goes up


def architecture(encoder: nn.Module) -> str:
    names = getattr(encoder.config, "architectures", None) or [type(encoder).__name__]
    return str(names[0])


def input_names(features: dict[str, Any]) -> list[str]:
    """The inputs the export takes: those of INPUTS the folder's tokenizer makes for the model
    (BERT: all three; XLM-R, ModernBERT, decoders: no token_type_ids), as optimum exports them."""
    return [name for name in INPUTS if isinstance(features.get(name), torch.Tensor)]


def features_of(model: Any, texts: list[str], prompt: str | None = None) -> dict[str, Any]:
    """The tokenized texts with the prompt, as ``encode`` makes them (with ``prompt_length`` where
    the pooling leaves the prompt out)."""
    if hasattr(model, "preprocess"):
        return model.preprocess(texts, prompt=prompt)
    # sentence-transformers 5: the prompt is prepended here, and its length (less the end token) given.
    features = model.tokenize([(prompt or "") + t for t in texts])
    if prompt:
        features["prompt_length"] = model.tokenize([prompt])["input_ids"].shape[-1] - 1
    return features


class _LastHiddenState(nn.Module):
    """The transformer as a function of positional inputs, named in ``names``, to its last hidden state."""

    def __init__(self, encoder: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = list(names)
        # Decoders: no key/value cache to return (it would become outputs of the graph).
        self.extra = {"use_cache": False} if getattr(encoder.config, "use_cache", None) is not None else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(**dict(zip(self.names, inputs)), **self.extra, return_dict=True).last_hidden_state


class OnnxEncoder:
    """Embeddings from a folder's ONNX file, as ``SentenceTransformer(folder).encode`` gives them:
    the folder's tokenizer and prompts, the transformer in ONNX Runtime, the modules after it
    (pooling, Dense, Normalize) in torch."""

    def __init__(self, model: Any, path: str, providers: Sequence[str] | None = None,
                 options: Any = None) -> None:
        self.model = model
        self.path = path
        self.session = runtime().InferenceSession(path, options,
                                                  providers=list(providers or ["CPUExecutionProvider"]))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.prompts: dict[str, str] = dict(model.prompts or {})
        self.default_prompt_name: str | None = model.default_prompt_name

    @classmethod
    def from_folder(cls, folder: str, int8: bool = False, providers: Sequence[str] | None = None,
                    options: Any = None, trust_remote_code: bool = False) -> OnnxEncoder:
        """The folder's ``onnx/model.onnx`` (``int8``: its ``onnx/model_qint8_avx512_vnni.onnx``);
        ``providers`` and ``options`` (threads, for one) go to ONNX Runtime's session."""
        path = os.path.join(transformer_dir(folder), ONNX_DIR, INT8_FILE if int8 else FP32_FILE)
        if not os.path.isfile(path):
            how = "embedtune export CHECKPOINT OUT --quantize int8" if int8 else "embedtune export CHECKPOINT OUT --onnx"
            raise FileNotFoundError(f"{path}: no such file; export the model with `{how}`, or call "
                                    f"embedtune.model.onnx.export_onnx({folder!r}, {'int8' if int8 else None!r})")
        model = load_folder(folder, trust_remote_code)
        # The transformer runs in ONNX Runtime: its torch weights need not stay in memory.
        model[0].model.to("meta")
        return cls(model, path, providers, options)

    @property
    def dim(self) -> int:
        named = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers 6; 5 says sentence_
        return int((named or self.model.get_sentence_embedding_dimension)())

    def prompt(self, prompt_name: str | None, prompt: str | None = None) -> str | None:
        """The prompt text, as ``SentenceTransformer.encode`` resolves it: ``prompt`` itself, else
        the named one, else the folder's default prompt, else none."""
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of the model's prompts "
                                 f"({', '.join(self.prompts) or 'it has none'})")
            return self.prompts[prompt_name]
        return self.prompts.get(self.default_prompt_name) if self.default_prompt_name else None

    def encode(self, texts: Sequence[str], prompt_name: str | None = None, batch_size: int = 32,
               prompt: str | None = None) -> torch.Tensor:
        """float32 embeddings (len(texts), dim), normalized where the folder has a Normalize module.
        Texts are batched longest first, so a batch carries little padding."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        text = self.prompt(prompt_name, prompt)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._embed([texts[i] for i in rows], text)
        return out

    def encode_query(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """With the model's ``query`` prompt (none without one), as ``encode_query`` does."""
        return self.encode(texts, batch_size=batch_size, prompt=self._first_prompt(QUERY_PROMPTS))

    def encode_document(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """With the model's ``document``, ``passage`` or ``corpus`` prompt (the first it has), as
        ``encode_document`` does."""
        return self.encode(texts, batch_size=batch_size, prompt=self._first_prompt(DOCUMENT_PROMPTS))

    def _first_prompt(self, names: Sequence[str]) -> str:
        # "" rather than None: no fallback to the default prompt, as sentence-transformers does.
        return next((self.prompts[n] for n in names if n in self.prompts), "")

    @torch.inference_mode()
    def _embed(self, texts: list[str], prompt: str | None) -> torch.Tensor:
        features = features_of(self.model, texts, prompt)
        mask = features["attention_mask"]
        feed = {name: (features[name] if name in features else torch.zeros_like(mask)).numpy()
                for name in self.inputs}  # token_type_ids: zeros, as optimum fills them
        (hidden,) = self.session.run([OUTPUT], feed)
        features["token_embeddings"] = torch.from_numpy(hidden)
        for module in list(self.model)[1:]:
            features = module(features)
        return features["sentence_embedding"].float()


def export_onnx(folder: str, quantize: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write the folder's transformer to ONNX (and int8 with ``quantize="int8"``) in its ``onnx/``,
    replaced whole and only once the new files are complete and agree with the model: a failed
    export leaves the folder as it was. Returns the files written, by precision, and each one's
    agreement: the least cosine between its embeddings and PyTorch's on a few probe texts."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: give None or 'int8'")
    runtime()
    model = load_folder(folder, trust_remote_code)
    target = os.path.join(transformer_dir(folder), ONNX_DIR)
    work = f"{target}.tmp"
    remove_path(work)  # the leftover of an export that was killed
    try:
        os.makedirs(work)
        fp32 = os.path.join(work, FP32_FILE)
        _export(model, fp32)
        found = {"fp32": os.path.join(target, FP32_FILE), "fp32 min cosine": agreement(model, fp32)}
        if found["fp32 min cosine"] < MIN_FP32_COSINE:
            raise OnnxExportError(f"the ONNX export of {architecture(model[0].model)} does not give the model's "
                                  f"embeddings (cosine {found['fp32 min cosine']:.4f} on probe texts); it was not kept")
        if quantize == "int8":
            int8 = os.path.join(work, INT8_FILE)
            _quantize(fp32, int8)
            found.update({"int8": os.path.join(target, INT8_FILE), "int8 min cosine": agreement(model, int8)})
            if found["int8 min cosine"] < LOW_INT8_COSINE:
                logger.warning("the int8 ONNX model agrees poorly with the model (cosine %.4f on probe texts); "
                               "check its retrieval metrics before using it", found["int8 min cosine"])
        fsync_tree(work)
        replace_folder(work, target)
    except BaseException:
        remove_path(work)
        raise
    return found


def agreement(model: Any, path: str) -> float:
    """The least cosine between the ONNX file's embeddings and the model's own, on PROBES in one
    padded batch, with and without the query prompt."""
    encoder = OnnxEncoder(model, path)
    least = 1.0
    for prompt_name in (None, *(n for n in QUERY_PROMPTS if n in encoder.prompts)):
        ours = encoder.encode(PROBES, prompt_name, batch_size=len(PROBES))
        theirs = model.encode(PROBES, prompt_name=prompt_name, batch_size=len(PROBES), convert_to_tensor=True)
        least = min(least, F.cosine_similarity(ours, theirs.float().cpu(), dim=-1).min().item())
    return round(least, 6)


def _export(model: Any, path: str) -> None:
    encoder = model[0].model
    if hasattr(encoder, "set_attn_implementation"):
        # Traced, eager attention is plain MatMul and Softmax, which ONNX Runtime runs faster than
        # the traced SDPA path (MiniLM-L6 on 2 cores: 49 against 39 documents/s) and can fuse.
        encoder.set_attn_implementation("eager")
    features = features_of(model, PROBES)
    names = input_names(features)
    graph = _LastHiddenState(encoder, names).eval()  # eval: the exporter restores this mode afterwards
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes about shapes taken as constants, checked by agreement()
            torch.onnx.export(graph, tuple(features[n] for n in names), path, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=[OUTPUT],
                              dynamic_axes={**{n: AXES for n in names}, OUTPUT: AXES}, do_constant_folding=True)
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise OnnxExportError(f"{architecture(encoder)} cannot be exported to ONNX with torch.onnx.export "
                              f"({type(exc).__name__}: {first})") from exc
    if _weight_bytes(encoder) > PROTOBUF_LIMIT:
        _gather_external_data(path)


def _weight_bytes(encoder: nn.Module) -> int:
    return sum(p.numel() * 4 for p in encoder.parameters())  # exported as float32


def _gather_external_data(path: str) -> None:
    """A model past 2 GiB is written with one file per weight; keep them in one file beside it,
    ``model.onnx_data``, as optimum does."""
    folder = os.path.dirname(path)
    before = set(os.listdir(folder))
    import onnx

    graph = onnx.load(path, load_external_data=True)
    onnx.save_model(graph, path, save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)
    for name in before - {os.path.basename(path), EXTERNAL_DATA}:
        os.remove(os.path.join(folder, name))


def _quantize(source: str, path: str) -> None:
    """Dynamic int8 as sentence-transformers' ``export_dynamic_quantized_onnx_model(model,
    "avx512_vnni")`` configures it: int8 weights, symmetric and per channel; uint8 activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = os.path.isfile(os.path.join(os.path.dirname(source), EXTERNAL_DATA))
    with _quiet_root_logger():
        quantize_dynamic(source, path, per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         use_external_data_format=external,
                         extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


class _NoPreprocessingAdvice(logging.Filter):
    """onnxruntime advises on the root logger to pre-process a model before quantizing it: for
    these models that changes neither the agreement nor the size (MiniLM-L6: measured)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    advice = _NoPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)
