"""The calibration pipeline: load a VLM, binarize its linears layer by layer, write the checkpoint.

:func:`calibrate` runs these stages in order, each a function below:

1. :func:`_resolve`: argument checks, architecture adapter, method, token pool, device;
2. :func:`_load_samples`: the encoded calibration data (methods that need statistics);
3. :func:`_open_partial`: the resume state ``<output>.partial``;
4. :func:`_load_model`: the model on CPU;
5. :func:`_find_linears`: the fused groups of linears of every decoder layer (and of the
   vision tower / projector with ``quantize_vision``);
6. :func:`_quantize_vision`: the vision groups first, so the decoder sees quantized visual tokens;
7. :func:`_quantize_decoder`: the layer loop (each layer on the compute device only while it is
   processed): capture, per-layer statistics, each fused group quantized with the method
   (:func:`_quantize_group`: packed into format v1 tensors, ``W_hat`` written back), the layer run
   to give the next one's inputs;
8. :func:`_write`: the checkpoint written atomically with its per-layer report.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_sab import __version__
from vllm_sab import format as fmt

from .layerwise import TOKEN_POOLS, StatsAccumulator, capture_layer_inputs, collect_stats, run_layer
from .methods import Method, get_method
from .methods.hessian import HessianError
from .models import adapter_for, fused_groups
from .resume import Partial
from .writer import atomic_output, check_output, write_checkpoint

logger = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def calibrate(
    model: str | Path,
    output: str | Path,
    *,
    method: str = "sign",
    block_size: int = 128,
    quantize_vision: bool = False,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    data: str | None = None,
    num_samples: int = 128,
    max_seq_len: int = 2048,
    seed: int = 0,
    skip_bad_samples: bool = False,
    image_root: str | Path | None = None,
    split: str = "train",
    image_column: str | None = "image",
    text_column: str | None = None,
    token_pool: str | None = None,
    atv_alpha: float = 1.0,
    method_options: dict[str, Any] | None = None,
    resume: bool = False,
) -> Path:
    """Binarize a Hugging Face VLM and write a sab checkpoint.

    Args:
        model: local folder or hub id of a LLaVA-1.5, Qwen2-VL or Qwen2.5-VL model.
        output: checkpoint folder to create (written atomically).
        method: binarization method name (see ``vllm_sab.calibrate.methods.METHODS``).
        block_size: input columns per scale block (multiple of 32).
        quantize_vision: also binarize the vision tower and projector/merger
            (linears whose K is not a multiple of ``block_size`` stay dense, with a warning).
        device: compute device for the per-layer work (default: CUDA if available).
        dtype: dtype of the unquantized tensors: ``auto`` (the model's), ``float16``,
            ``bfloat16`` or ``float32``.
        overwrite: replace an existing ``output``.
        progress: show progress bars (layers, and method steps inside a layer).
        data: calibration data: a ``.jsonl`` file, a ``datasets`` name or saved folder, or
            ``"builtin"`` (the offline synthetic ShapesQA samples, for the shipped
            ``models/shapes-llava`` and tests); see :mod:`vllm_sab.calibrate.data`.
            Required by the methods that use Hessians (``None`` is refused, never
            replaced by the built-in samples); unused by data-free methods (``sign``).
        num_samples: calibration samples.
        max_seq_len: tokens per sample at most (image tokens are never cut).
        seed: seed of the sample choice (the whole run is deterministic for a seed).
        skip_bad_samples: skip (and count) missing or corrupt samples instead of failing.
        image_root: folder that relative image paths of a JSONL file refer to.
        split, image_column, text_column: a Hugging Face dataset's split, image column
            (None: text-only data) and text column (None: the first of
            ``data.TEXT_COLUMNS`` it has); see :func:`~vllm_sab.calibrate.data.load_hf_dataset`.
        token_pool: tokens of the compensation Hessian: ``all``, ``text`` or
            ``atv`` (ATV-Pruning's text + drift-selected visual pool); None
            means the method's ``default_token_pool`` (``atv`` for the
            ATV-Pruning methods, ``all`` otherwise).
        atv_alpha: ATV's alpha (visual share multiplier).
        method_options: extra constructor options of the method.
        resume: continue an interrupted run from ``<output>.partial`` (finished
            layers are loaded, not recomputed).

    Returns:
        The output folder.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is False.
        UnsupportedArchitectureError: the model type is not supported.
        ValueError: unknown method, dtype or token pool; no ``data`` for a method that
            needs it (``CalibrationDataError``); the model is already quantized; a resume
            with different settings.
        FormatError: a language-model linear has K not a multiple of ``block_size``.
        HessianError: a layer's Hessian cannot be inverted (the layer is named).
        FloatingPointError: NaN/Inf activations or weights (the layer is named).
    """
    request = _Request(
        model=model, output=output, method=method, block_size=block_size, quantize_vision=quantize_vision,
        device=device, dtype=dtype, overwrite=overwrite, progress=progress, data=data,
        num_samples=num_samples, max_seq_len=max_seq_len, seed=seed, skip_bad_samples=skip_bad_samples,
        image_root=image_root, split=split, image_column=image_column, text_column=text_column,
        token_pool=token_pool, atv_alpha=atv_alpha, method_options=method_options, resume=resume,
    )
    t0 = time.time()
    run = _resolve(request)
    samples = _load_samples(request, run)
    partial = _open_partial(request, run, samples)
    hf = _load_model(request, run)
    linears = _find_linears(request, run, hf)
    results = _Results(run.adapter)
    if run.quantizer.needs_stats:
        results.calibration = {"data": str(data), "samples": len(samples), "token_pool": run.token_pool}
    # Vision tower and projector first: the decoder layers then see quantized visual tokens.
    _quantize_vision(request, run, hf, linears.vision_groups, samples, results)
    _quantize_decoder(request, run, hf, linears, samples, partial, results)
    return _write(request, run, hf, results, partial, t0)


# ---------------------------------------------------------------------------------------
# The stages of calibrate(), in the order it runs them. As in GPTQ's llama_sequential and
# llm-compressor's sequential pipeline: capture the first decoder layer's inputs once, then
# per layer collect its input statistics, quantize its linears, and run the quantized layer
# to get the next layer's inputs. The state they pass is explicit: the request (the
# arguments), the resolved run (_Run), the model, the linears found (_Linears), the
# calibration samples, the resume state (Partial) and what was produced (_Results).
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    """The arguments of :func:`calibrate`, unchanged (see its docstring)."""

    model: str | Path
    output: str | Path
    method: str
    block_size: int
    quantize_vision: bool
    device: str | torch.device | None
    dtype: str
    overwrite: bool
    progress: bool
    data: str | None
    num_samples: int
    max_seq_len: int
    seed: int
    skip_bad_samples: bool
    image_root: str | Path | None
    split: str
    image_column: str | None
    text_column: str | None
    token_pool: str | None
    atv_alpha: float
    method_options: dict[str, Any] | None
    resume: bool


@dataclass(frozen=True)
class _Run:
    """What the argument checks resolve before any data or weight is read.

    Attributes:
        adapter: the architecture adapter of the model (:func:`~.models.adapter_for`).
        quantizer: the method instance, its options checked.
        token_pool: the compensation token pool (the request's, or the method's default).
        device: the compute device of the per-layer work.
    """

    adapter: Any
    quantizer: Method
    token_pool: str
    device: torch.device


@dataclass(frozen=True)
class _Linears:
    """The linears to quantize, found (and K checked) before any is touched.

    Attributes:
        layers: ``[(in-memory name, decoder layer)]`` in order.
        layer_groups: per decoder layer, its fused groups ``[[(name, nn.Linear)]]``.
        vision_groups: fused groups of the vision tower / projector (empty unless
            ``quantize_vision``).
    """

    layers: list[tuple[str, nn.Module]]
    layer_groups: list[list[list[tuple[str, nn.Linear]]]]
    vision_groups: list[list[tuple[str, nn.Linear]]]


def _resolve(req: _Request) -> _Run:
    """Check the arguments that need no model or data; resolve adapter, method, pool and device.

    Raises:
        OutputExistsError, ValueError, UnsupportedArchitectureError: see :func:`calibrate`.
    """
    check_output(req.output, req.overwrite)
    if req.dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {req.dtype!r}; choose one of {sorted(_DTYPES)}")
    if req.token_pool is not None and req.token_pool not in TOKEN_POOLS:
        raise ValueError(f"unknown token pool {req.token_pool!r}; choose one of {', '.join(TOKEN_POOLS)}")
    adapter = adapter_for(req.model)
    quantizer = get_method(req.method, block_size=req.block_size, **(req.method_options or {}))
    token_pool = req.token_pool or quantizer.default_token_pool
    device = torch.device(req.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _Run(adapter, quantizer, token_pool, device)


def _load_samples(req: _Request, run: _Run) -> list | None:
    """The encoded calibration samples, or None for a data-free method.

    Raises:
        CalibrationDataError: no ``data`` for a method that needs it; bad data.
    """
    if not run.quantizer.needs_stats:
        return None
    if req.data is None:
        from .data import NO_DATA_MESSAGE, CalibrationDataError

        raise CalibrationDataError(f"method {req.method!r} calibrates on data; {NO_DATA_MESSAGE}")
    if str(req.data) == "builtin":
        logger.warning(
            "calibrating on the built-in synthetic ShapesQA samples (64-pixel shapes, short questions): "
            "right for models/shapes-llava and tests, not representative data for another model"
        )
    return _encoded_samples(req.model, req.data, req.num_samples, req.max_seq_len, req.seed,
                            req.skip_bad_samples, req.image_root,
                            dict(split=req.split, image_column=req.image_column, text_column=req.text_column))


def _open_partial(req: _Request, run: _Run, samples: list | None) -> Partial:
    """The resume state ``<output>.partial`` keyed by every setting that changes the result.

    Raises:
        ResumeError: ``resume`` with settings that differ from the interrupted run's.
    """
    settings = {
        "model": str(req.model), "method": req.method, "block_size": req.block_size,
        "quantize_vision": req.quantize_vision, "dtype": req.dtype, "data": req.data,
        "num_samples": req.num_samples, "max_seq_len": req.max_seq_len, "seed": req.seed,
        "skip_bad_samples": req.skip_bad_samples,
        "image_root": None if req.image_root is None else str(req.image_root),
        "split": req.split, "image_column": req.image_column, "text_column": req.text_column,
        "token_pool": run.token_pool, "atv_alpha": req.atv_alpha, "method_options": req.method_options or {},
        "vllm_sab_version": __version__,
        # What the model is calibrated on, as encoded: another file with the same name, edited
        # samples or images, or another processor all change it.
        "data_fingerprint": None if samples is None else data_fingerprint(samples),
    }
    return Partial(Path(str(Path(req.output).resolve()) + ".partial"), settings, req.resume)


def _load_model(req: _Request, run: _Run) -> nn.Module:
    """The Hugging Face model on CPU, in eval mode.

    Raises:
        ValueError: the model is already quantized.
    """
    hf = run.adapter.load(req.model, _DTYPES[req.dtype]).eval()
    if getattr(hf.config, "quantization_config", None):
        raise ValueError(f"{req.model}: already quantized (config.json has a quantization_config)")
    return hf


def _find_linears(req: _Request, run: _Run, hf: nn.Module) -> _Linears:
    """Every decoder layer's fused groups of linears, and the vision ones if asked for.

    Raises:
        FormatError: a decoder linear's K is not a multiple of the block size (vision
            linears are kept dense instead, with a warning).
    """
    block_size = req.block_size
    layers = run.adapter.layers(hf)
    layer_groups: list[list[list[tuple[str, nn.Linear]]]] = []
    for layer_name, layer in layers:
        linears = {f"{layer_name}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for name, lin in linears.items():
            if lin.in_features % block_size:
                raise fmt.FormatError(
                    f"{name}: K={lin.in_features} is not a multiple of block_size={block_size}; "
                    "pass a --block-size that divides every decoder linear's input size"
                )
        layer_groups.append([[(n, linears[n]) for n in g] for g in fused_groups(linears)])
    vision_groups: list[list[tuple[str, nn.Linear]]] = []
    if req.quantize_vision:
        kept = {}
        for name, lin in run.adapter.vision_linears(hf).items():
            if lin.in_features % block_size:
                logger.warning("%s: K=%d is not a multiple of %d; kept dense", name, lin.in_features, block_size)
            else:
                kept[name] = lin
        vision_groups = [[(n, kept[n]) for n in g] for g in fused_groups(kept)]
    return _Linears(layers, layer_groups, vision_groups)


def _quantize_vision(req: _Request, run: _Run, hf: nn.Module, vision_groups, samples, results: _Results) -> None:
    """Quantize the vision tower / projector groups (statistics from full-model forwards)."""
    if not vision_groups:
        return
    stats = None
    if run.quantizer.needs_stats:
        stats = _vision_stats(hf, run.adapter, vision_groups, samples, run.device)
    for group in tqdm(vision_groups, desc="vision", unit="group", disable=not req.progress):
        _quantize_group(group, run.quantizer, stats[group[0][0]] if stats else None, run.device, results, "vision")


def _quantize_decoder(req: _Request, run: _Run, hf: nn.Module, linears: _Linears, samples, partial: Partial,
                      results: _Results) -> None:
    """The layer loop: each decoder layer on the device, restored from ``partial`` or quantized
    on the statistics of its inputs (and saved to ``partial``), then run to give the next
    layer's inputs.

    Raises:
        HessianError, FloatingPointError, ValueError: from a layer (named); finished layers
            stay in ``partial`` for ``--resume``.
    """
    quantizer, device, progress = run.quantizer, run.device, req.progress
    try:
        inputs = None
        if quantizer.needs_stats:
            inputs = _capture(hf, run.adapter, samples, device)
        bar = tqdm(list(zip(linears.layers, linears.layer_groups)), desc=f"sab {req.method}", unit="layer",
                   disable=not progress)
        for (layer_name, layer), groups in bar:
            layer.to(device)
            done = partial.load(layer_name)
            if done is not None:
                results.restore(done, groups)
            else:
                stats = None
                if quantizer.needs_stats:
                    reps = {g[0][0]: g[0][1] for g in groups}
                    stats = collect_stats(layer, reps, inputs, device, token_pool=run.token_pool,
                                          atv_alpha=req.atv_alpha, where=layer_name)
                mark = results.mark()
                for group in tqdm(groups, desc=layer_name.rsplit(".", 1)[-1], unit="group", leave=False,
                                  disable=not progress):
                    _quantize_group(group, quantizer, stats[group[0][0]] if stats else None, device, results,
                                    layer_name)
                partial.save(layer_name, results.since(mark))
            if inputs is not None:
                inputs = run_layer(layer, inputs, device, where=layer_name)
            layer.to("cpu")

    except BaseException:
        if partial.started:
            logger.error("finished layers are kept in %s; rerun with --resume to continue", partial.folder)
        raise


def _write(req: _Request, run: _Run, hf: nn.Module, results: _Results, partial: Partial, t0: float) -> Path:
    """Write the checkpoint and its report atomically, then drop the resume state.

    ``t0`` is the run's start (``time.time()``), for the report's ``calibration_seconds``.

    Returns:
        The output folder (resolved).
    """
    method, block_size = req.method, req.block_size
    # The saved state is read now, from the modules the loop left on CPU: moving a layer to the
    # device and back gives its parameters new tensors, so a state_dict() taken before the loop
    # would hold the weights as loaded, not the dense results written into the moved layer.
    state = {run.adapter.checkpoint_name(k): v for k, v in results.final_state(hf).items()}
    quant_config = (
        fmt.SabQuantizationConfig(results.profiles, results.modules, method=method, extra={"block_size": block_size})
        if results.modules
        else None  # dense methods (pruning): an ordinary checkpoint
    )
    report = _report(req.model, method, results.reports, state, time.time() - t0)
    if results.calibration:
        report["calibration"] = results.calibration
    with atomic_output(req.output, req.overwrite) as tmp:
        hf.config.architectures = [type(hf).__name__]
        write_checkpoint(tmp, state, hf.config.to_diff_dict(), quant_config, report)
        _save_processor(req.model, hf, tmp)
    partial.remove()
    out = Path(req.output).resolve()
    logger.info(
        "wrote %s: %d quantized linears, %.3f true bits/weight, %.1f MB",
        out,
        len(results.modules),
        report["summary"]["true_bits_per_weight"],
        report["summary"]["checkpoint_tensor_bytes"] / 1e6,
    )
    return out


class _Results:
    """Everything the quantization produced so far: packed tensors, dense results, profiles, module list, reports."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.profiles: dict[str, fmt.LayerProfile] = {}
        self.modules: dict[str, fmt.QuantizedModule] = {}
        self.reports: list[dict[str, Any]] = []
        self.calibration: dict[str, Any] = {}
        self.packed: dict[str, dict[str, torch.Tensor]] = {}  # in-memory name -> format v1 tensors
        self.dense: dict[str, torch.Tensor] = {}  # in-memory name -> a dense method's new weight (CPU)

    def add(self, name: str, lin: nn.Linear, comp: fmt.BinaryComponents, tensors: dict, report: dict) -> None:
        p = comp.profile
        self.profiles[p.key] = p
        ckpt = self.adapter.checkpoint_name(name)
        self.modules[ckpt] = fmt.QuantizedModule(p.key, comp.shape)
        self.packed[name] = {s: t.cpu() for s, t in tensors.items()}
        self.reports.append(report)

    def add_dense(self, name: str, weight: torch.Tensor, report: dict) -> None:
        """Record a dense method's new ``weight`` ``[N, K]`` of module ``name`` (kept on CPU, for resume)."""
        self.dense[name] = weight.detach().cpu()
        self.reports.append(report)

    def final_state(self, hf: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to save, in memory names: ``hf``'s state as it is now (dense results are in
        its modules), with each quantized module's ``.weight`` replaced by its packed tensors.

        Raises:
            RuntimeError: a dense result is not what the module holds (it was written into a
                tensor that is no longer the module's).
        """
        state = hf.state_dict()
        for name, weight in self.dense.items():
            saved = state[f"{name}.weight"]
            if not torch.equal(saved.cpu(), weight.to(saved.dtype)):
                raise RuntimeError(f"{name}.weight: the module does not hold the method's dense result")
        for name, tensors in self.packed.items():
            state.pop(f"{name}.weight", None)
            state.update({f"{name}.{s}": t for s, t in tensors.items()})
        # Tied embeddings (SmolLM2, Qwen2-VL-2B ...) are one tensor under two names; the
        # checkpoint must keep the input embedding's, which transformers and vLLM load
        # (vLLM skips lm_head.* when tie_word_embeddings). The safetensors writer would
        # otherwise keep whichever name sorts first: lm_head.weight.
        tied = _tied_output_embedding(hf)
        if tied is not None:
            state.pop(tied, None)
        return state

    def mark(self) -> int:
        return len(self.reports)

    def since(self, mark: int) -> list[dict[str, Any]]:
        """Reports added after ``mark``, each with its module's tensors and profile (for resume)."""
        out = []
        for r in self.reports[mark:]:
            mem = r["memory_name"]
            if r["profile"] == "dense":
                out.append({"report": r, "profile": None, "tensors": {"weight": self.dense[mem]}})
            else:
                out.append({"report": r, "profile": self.profiles[r["profile"]], "tensors": self.packed[mem]})
        return out

    def restore(self, done: list[dict[str, Any]], groups: list[list[tuple[str, nn.Linear]]]) -> None:
        """Put a finished layer back: tensors into the state, ``W_hat`` into the modules."""
        linears = {n: lin for g in groups for n, lin in g}
        for item in done:
            r, p, tensors = item["report"], item["profile"], item["tensors"]
            name = r["memory_name"]
            lin = linears[name]
            if p is None:  # dense method result
                _set_weight(lin, tensors["weight"])
                self.add_dense(name, tensors["weight"], r)
                continue
            _set_weight(lin, fmt.dequantize(tensors, p, where=name))
            self.profiles[p.key] = p
            self.modules[self.adapter.checkpoint_name(name)] = fmt.QuantizedModule(p.key, tuple(r["shape"]))
            self.packed[name] = {s: t.cpu() for s, t in tensors.items()}
            self.reports.append(r)


def _set_weight(lin: nn.Linear, w_hat: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(w_hat.to(lin.weight.device, lin.weight.dtype))


def _quantize_group(group, quantizer, stats, device, results: _Results, where: str) -> None:
    """Quantize one fused group (stacked rows), write ``W_hat`` into its modules, record everything."""
    weight = torch.cat([lin.weight.detach().to(device, torch.float32) for _, lin in group])
    if not bool(torch.isfinite(weight).all()):
        raise FloatingPointError(f"{group[0][0]}: NaN/Inf in the weights")
    sizes = [lin.out_features for _, lin in group]
    result, extra = _run_method(quantizer, weight, stats, group)
    if getattr(quantizer, "dense_output", False):
        _dense_group(group, result, weight, stats, sizes, results, extra)
        return
    parts = result.split_rows(sizes)
    for (name, lin), comp, w in zip(group, parts, weight.split(sizes)):
        tensors = fmt.pack(comp, where=name)
        w_hat = fmt.dequantize(tensors, comp.profile, where=name, check=False)
        err = w - w_hat
        rel_err = float(err.norm() / w.norm().clamp_min(1e-30))
        if not math.isfinite(rel_err):
            raise FloatingPointError(f"{name}: non-finite reconstruction")
        n, k = comp.shape
        report = {
            "name": results.adapter.checkpoint_name(name),
            "memory_name": name,
            "shape": [n, k],
            "profile": comp.profile.key,
            "true_bits_per_weight": fmt.true_bits_per_weight(comp.profile, n, k),
            "paper_weight_bits": fmt.paper_weight_bits(comp.profile),
            "rel_error": rel_err,
            **extra,
        }
        if stats is not None:
            # Output error on the calibration inputs: tr(E H E^T) / tr(W H W^T).
            h = stats.hessian
            num = float(((err @ h) * err).sum())
            den = float(((w @ h) * w).sum())
            report["output_rel_error"] = math.sqrt(max(num, 0.0) / max(den, 1e-30))
        _set_weight(lin, w_hat)
        results.add(name, lin, comp, tensors, report)


def _group_label(group) -> str:
    """``a.q_proj`` or ``a.q_proj (fused with k_proj, v_proj)`` for error messages."""
    first = group[0][0]
    if len(group) == 1:
        return first
    return f"{first} (fused with {', '.join(n.rsplit('.', 1)[-1] for n, _ in group[1:])})"


def _run_method(quantizer, weight: torch.Tensor, stats, group):
    """``quantizer.quantize(weight, stats)`` and the method's extra report fields for this call.

    Raises:
        HessianError, FloatingPointError, ValueError: the method's error, prefixed with the
            name of the layer (fused group) it was quantizing.
    """
    quantizer.last_report = {}
    try:
        result = quantizer.quantize(weight, stats)
    except (HessianError, FloatingPointError, ValueError) as e:
        raise type(e)(f"{_group_label(group)}: {e}") from e
    return result, dict(quantizer.last_report or {})


def _dense_group(group, new_weight: torch.Tensor, weight: torch.Tensor, stats, sizes, results: _Results,
                 extra: dict) -> None:
    """A dense method's result (e.g. pruned weights): the modules keep a dense ``.weight``."""
    if tuple(new_weight.shape) != tuple(weight.shape) or not bool(torch.isfinite(new_weight).all()):
        raise FloatingPointError(f"{group[0][0]}: the method returned a bad dense weight")
    for (name, lin), w_new, w in zip(group, new_weight.split(sizes), weight.split(sizes)):
        err = w - w_new
        report = {
            "name": results.adapter.checkpoint_name(name),
            "memory_name": name,
            "shape": list(w.shape),
            "profile": "dense",
            # A dense tensor costs its dtype's bits whatever its zeros.
            "true_bits_per_weight": float(lin.weight.element_size() * 8),
            "paper_weight_bits": float(lin.weight.element_size() * 8),
            "sparsity": float((w_new == 0).float().mean()),
            "rel_error": float(err.norm() / w.norm().clamp_min(1e-30)),
            **extra,
        }
        if stats is not None:
            h = stats.hessian
            report["output_rel_error"] = math.sqrt(
                max(float(((err @ h) * err).sum()), 0.0) / max(float(((w @ h) * w).sum()), 1e-30)
            )
        _set_weight(lin, w_new)
        results.add_dense(name, w_new.to(lin.weight.dtype), report)


def _tied_output_embedding(hf: nn.Module) -> str | None:
    """State-dict name of the output embedding's weight when it is the input embedding's
    tensor (tied), else None."""
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return None
    return next(f"{name}.weight" for name, mod in hf.named_modules() if mod is out)


def data_fingerprint(samples) -> str:
    """SHA-256 (hex) of encoded calibration samples: every input tensor's name, dtype, shape and
    bytes, and the visual mask, in sample order. Equal for the same data, processor and settings."""
    digest = hashlib.sha256()
    for enc in samples:
        for name, t in sorted({**enc.inputs, "_visual_mask": enc.visual_mask}.items()):
            t = t.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest.update(b"|")
    return digest.hexdigest()


def _encoded_samples(model, data, num_samples, max_seq_len, seed, skip_bad_samples, image_root, columns):
    from transformers import AutoProcessor

    from . import data as calib_data

    processor = AutoProcessor.from_pretrained(str(model))
    raw = calib_data.load_calibration_data(
        data, num_samples=num_samples, seed=seed, skip_bad_samples=skip_bad_samples, image_root=image_root,
        **columns,
    )
    return [calib_data.encode(processor, s, max_seq_len=max_seq_len) for s in raw]


def _batches(samples):
    for enc in samples:
        yield enc.inputs, enc.visual_mask


def _move_except(module: nn.Module, skip: nn.Module, device) -> None:
    """Move ``module``'s parameters and buffers to ``device``, except those under ``skip``."""
    if module is skip:
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, buf in list(module.named_buffers(recurse=False)):
        module._buffers[name] = buf.to(device)
    for child in module.children():
        _move_except(child, skip, device)


def _capture(hf, adapter, samples, device):
    """Decoder-layer-0 inputs of every sample; only the non-decoder parts visit ``device``."""
    layers = hf.get_submodule(adapter.decoder_layers)
    _move_except(hf, layers, device)
    try:
        return capture_layer_inputs(hf, layers[0], _batches(samples), device)
    finally:
        _move_except(hf, layers, "cpu")


def _vision_stats(hf, adapter, vision_groups, samples, device):
    """Hessians of the vision tower / projector linears from full-model forwards that stop at the decoder."""
    reps = {g[0][0]: g[0][1] for g in vision_groups}
    acc = {n: StatsAccumulator(l.in_features, device) for n, l in reps.items()}

    def make_hook(name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            every = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            acc[name].add(x, every, every)  # every vision-side token is visual and in the pool

        return hook

    handles = [l.register_forward_pre_hook(make_hook(n)) for n, l in reps.items()]
    try:
        _capture(hf, adapter, samples, device)
    finally:
        for h in handles:
            h.remove()
    return {n: a.finish() for n, a in acc.items() if a.n}


def _report(model, method, layers, state, seconds) -> dict[str, Any]:
    n_weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
    bits = sum(r["true_bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers)
    paper = sum(r["paper_weight_bits"] * r["shape"][0] * r["shape"][1] for r in layers)
    seen: set[int] = set()
    total = 0
    for t in state.values():
        if t.data_ptr() not in seen:  # tied tensors are stored once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return {
        "source_model": str(model),
        "method": method,
        "format_version": fmt.FORMAT_VERSION,
        "summary": {
            "quantized_linears": len(layers),
            "quantized_weights": n_weights,
            "true_bits_per_weight": bits / max(n_weights, 1),
            "paper_weight_bits": paper / max(n_weights, 1),
            "quantized_bytes": bits / 8,
            "fp16_bytes_of_quantized": n_weights * 2,
            "checkpoint_tensor_bytes": total,
            "calibration_seconds": seconds,
        },
        "layers": layers,
    }


def _save_processor(model: str | Path, hf: nn.Module, folder: Path) -> None:
    """Copy processor/tokenizer and generation config so the checkpoint is self-contained."""
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(str(model)).save_pretrained(folder)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(folder)
