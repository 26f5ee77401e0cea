"""The block-wise calibration pipeline shared by every LLM compression method.

1. Capture the inputs of the first decoder block for every calibration sample (the model runs
   up to block 0 and stops).
2. Walk the blocks in windows of K consecutive blocks with overlap O (K=1, O=0: one block at a
   time). For each window the method's ``on_window`` event may read and change the window's
   blocks, using the cached inputs of the quantized stream (and, if the method asks, the
   full-precision stream and FP copies of the window's blocks).
3. A block is finalized when it leaves its last window: ``on_finalize`` runs, then the cached
   inputs advance through it (quantized stream through the changed block, FP stream through the
   FP copy), and a checkpoint is written so that ``resume`` continues exactly there.

Only the blocks of the current window live on the compute device. Cached activations stay on
the CPU, memory-mapped on disk when they do not fit in RAM. Under ``torchrun`` each rank holds a
shard of the calibration samples and methods all-reduce their statistics through
:meth:`BlockwisePipeline.all_reduce_sum` / ``all_reduce_max``.

Methods never own the layer loop; they implement :class:`BlockwiseMethod`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core import dist
from slimkit.core.errors import SlimkitError
from slimkit.core.logs import progress
from slimkit.llm.activation_store import ActivationStore, available_ram_bytes
from slimkit.llm.block_maps import BlockMap, block_map_for, get_blocks, get_module

log = logging.getLogger("slimkit")
OFFLOAD_MODES = ("auto", "ram", "disk")


@dataclass
class PipelineFields:
    """Config fields of every method that runs on the pipeline (mixed into method configs)."""

    batch_size: int = field(default=4, metadata={"help": "calibration samples per forward pass"})
    device: str = field(default="auto", metadata={"help": "compute device: auto, cpu, cuda, ..."})
    offload: str = field(
        default="auto",
        metadata={
            "help": "cached activations in ram, on disk, or auto",
            "choices": list(OFFLOAD_MODES),
        },
    )

    def pipeline_options(self) -> PipelineOptions:
        return PipelineOptions(batch_size=self.batch_size, device=self.device, offload=self.offload)


@dataclass
class PipelineOptions:
    """Args:
    window: K, the number of consecutive blocks processed jointly (1 = block by block).
    overlap: O, blocks shared by consecutive windows (0 <= O < K).
    batch_size: calibration samples per forward pass.
    device: compute device (``auto`` = the accelerator if there is one, else ``cpu``).
    offload: where cached activations live: ``ram``, ``disk`` or ``auto`` (disk when the
        streams would take more than half of the available RAM).
    offload_dir: directory for disk-offloaded activations (default: a temporary directory).
    """

    window: int = 1
    overlap: int = 0
    batch_size: int = 4
    device: str = "auto"
    offload: str = "auto"
    offload_dir: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            return torch.device(acc.current_accelerator().type)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SlimkitError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N, mps, xpu"
        ) from None
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not backend.is_available():
            raise SlimkitError(
                f"device {name!r} is not available on this machine; use --device cpu or auto"
            )
    return dev


def plan_windows(n_blocks: int, window: int, overlap: int) -> list[tuple[list[int], list[int]]]:
    """[(blocks of the window, blocks finalized after it)] for K=window, O=overlap.

    Windows start every K - O blocks; the last window is aligned to end at the last block, so
    every block is in at least one window and each is finalized exactly once, in order.
    """
    if window < 1:
        raise SlimkitError(f"window must be >= 1 (got {window})")
    if window > n_blocks:
        raise SlimkitError(
            f"window of {window} blocks is larger than the model ({n_blocks} blocks)"
        )
    if not 0 <= overlap < window:
        raise SlimkitError(
            f"overlap must be in 0..{window - 1} for a window of {window} (got {overlap})"
        )
    step = window - overlap
    starts = list(range(0, n_blocks - window + 1, step))
    if starts[-1] + window < n_blocks:
        starts.append(n_blocks - window)
    plan = []
    for i, s in enumerate(starts):
        blocks = list(range(s, s + window))
        end = starts[i + 1] if i + 1 < len(starts) else n_blocks
        plan.append((blocks, list(range(s, end))))
    return plan


class BlockState:
    """State that methods leave on a block beside its ``state_dict`` (quantization records,
    activation quantizers): saved with the block in every checkpoint, put back on resume and
    removed from the full-precision copies. The package that creates such state registers one
    with :func:`register_block_state`; the pipeline itself knows none of them.
    """

    def save(self, pipe: BlockwisePipeline, block_id: int):
        """(tensors, metadata strings) to store in the block's file; keys must not collide with
        the block's state_dict (prefix them with ``@``)."""
        return {}, {}

    def load(
        self,
        pipe: BlockwisePipeline,
        block_id: int,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, str],
    ) -> set[str]:
        """Restore from a block file; returns the metadata keys it has read."""
        return set()

    def strip(self, module: nn.Module) -> None:
        """Remove this state from ``module`` (a deep copy that must run in full precision)."""


BLOCK_STATES: list[BlockState] = []


def register_block_state(state: BlockState) -> BlockState:
    """Add ``state`` to what every checkpoint saves per block (idempotent per class)."""
    if not any(type(s) is type(state) for s in BLOCK_STATES):
        BLOCK_STATES.append(state)
    return state


class BlockwiseMethod:
    """Events a compression method implements to run on the pipeline."""

    needs_fp: bool = False  # keep the full-precision activation stream and FP block copies

    def on_start(self, pipe: BlockwisePipeline) -> None: ...

    def on_window(self, win: Window) -> None: ...

    def on_finalize(self, win: Window, index: int, block: nn.Module) -> None: ...

    def on_end(self, pipe: BlockwisePipeline) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State carried between windows (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Window:
    index: int
    block_ids: list[int]
    finalize_ids: list[int]
    blocks: list[nn.Module]
    fp_blocks: list[nn.Module] | None
    inputs_q: ActivationStore
    inputs_fp: ActivationStore | None
    pipe: BlockwisePipeline
    extra: dict = field(default_factory=dict)

    def named_linears(self, block_id: int) -> dict[str, nn.Module]:
        """Full names (as in the model) -> modules, for the block's linears."""
        return self.pipe.named_linears(block_id)

    def inputs_of(self, block_id: int) -> ActivationStore:
        """Quantized-stream inputs of a block of this window (earlier window blocks re-run)."""
        pos = self.block_ids.index(block_id)
        return self.inputs_q if pos == 0 else self.pipe.run_blocks(self.blocks[:pos], self.inputs_q)


class _Stop(Exception):
    pass


class BlockwisePipeline:
    """Runs a :class:`BlockwiseMethod` over a causal LM's decoder blocks.

    Args:
        model: a transformers causal LM of a family in ``slimkit list families``, or any model
            with a ``block_map`` (its adapter, e.g. :func:`encoder_block_map` for a ViT encoder).
        calib: int64 token ids [n_samples, seq_len], or what the adapter's ``feed`` takes
            ([n_samples, ...] images for an encoder).
        options: :class:`PipelineOptions`.
        checkpoint_dir: where per-block checkpoints go (None: no checkpoints).
        identity: JSON-able description of the job (method config, data fingerprint); a
            checkpoint is only resumed by a job with the same identity.
        block_map: the model adapter; None: the registered map of ``model.config.model_type``.

    Example:
        >>> pipe = BlockwisePipeline(model, calib, PipelineOptions(window=2, overlap=1))  # doctest: +SKIP
        >>> pipe.run(method)
    """

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        options: PipelineOptions | None = None,
        checkpoint_dir: str | Path | None = None,
        identity: dict | None = None,
        block_map: BlockMap | None = None,
    ):
        self.model = model
        self.identity = identity or {}  # what must match for a checkpoint to be resumed
        # compute time of the checkpointed windows of earlier (killed) processes, and the window
        # this process resumed at (None: started from scratch)
        self.prior_seconds = 0.0
        self.resumed_at: int | None = None
        self._t_start = time.time()
        self.opts = options or PipelineOptions()
        if self.opts.offload not in OFFLOAD_MODES:
            raise SlimkitError(
                f"unknown offload mode {self.opts.offload!r}; choose one of: {', '.join(OFFLOAD_MODES)}"
            )
        if self.opts.batch_size < 1:
            raise SlimkitError(f"batch size must be >= 1 (got {self.opts.batch_size})")
        self.bmap: BlockMap = block_map or block_map_for(model)
        self.blocks = get_blocks(model, self.bmap)
        self.bmap.check_calib(calib)
        if calib.shape[0] < dist.world_size():
            raise SlimkitError(
                f"{calib.shape[0]} calibration samples cannot be shared by {dist.world_size()} ranks"
            )
        self.n_total = calib.shape[0]
        self.calib = calib[dist.shard(list(range(calib.shape[0])))] if dist.is_dist() else calib
        self.device = resolve_device(self.opts.device)
        self.plan = plan_windows(len(self.blocks), self.opts.window, self.opts.overlap)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.kwargs: dict = {}
        self.args: tuple = ()
        # blocks of different layer types (Gemma-2/3's sliding and full attention) take different
        # position embeddings and masks: each type's block arguments are captured at its first
        # block, and every block is called with those of its type
        types = list(getattr(getattr(model, "config", None), "layer_types", None) or [])
        self.layer_types = types if len(types) == len(self.blocks) and len(set(types)) > 1 else None
        self.type_inputs: dict[str, tuple[tuple, dict]] = {}
        self._typing = False
        for blk, t in zip(self.blocks, self.layer_types or []):
            blk._slimkit_layer_type = t  # kept by the deep copies of the FP stream
        # compressed-weight records that methods write, by linear name (slimkit.quant's
        # QuantizedWeight); saved with their block by a registered BlockState
        self.records: dict[str, object] = {}
        self.log: list[dict] = []  # per-layer / per-window metrics reported by methods
        self._names = {id(m): n for n, m in model.named_modules()}
        self._block_prefix = self.bmap.blocks
        self._act_shape: tuple[int, ...] | None = None  # one sample's block input, from capture

    # ----------------------------------------------------------------------------- helpers
    def named_linears(self, block_id: int) -> dict[str, nn.Module]:
        block = self.blocks[block_id]
        out = {}
        for rel in self.bmap.linears():
            m = get_module(block, rel)
            if m is not None:
                out[f"{self._block_prefix}.{block_id}.{rel}"] = m
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(t)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_max(t)

    def act_shape(self) -> tuple[int, ...]:
        """The shape of one sample's block input (e.g. [seq_len, hidden]), learned by running
        the adapter's feed on one batch up to block 0."""
        if self._act_shape is None:
            self.capture(kwargs_only=True)
        return self._act_shape

    def new_store(self, shape: tuple[int, ...] | None = None) -> ActivationStore:
        """A store for one activation per local sample, of ``shape`` (default: block 0's input;
        blocks that change the shape, such as a TinyViT's stages, give their own)."""
        shape = self.act_shape() if shape is None else tuple(shape)
        return ActivationStore(self.calib.shape[0], shape, self._disk_dir())

    def _disk_dir(self) -> str | None:
        if self.opts.offload == "ram":
            return None
        n = self.calib.shape[0]
        streams = 3 if getattr(self, "_method", None) is not None and self._method.needs_fp else 2
        need = streams * n * math.prod(self.act_shape()) * 4
        if self.opts.offload == "auto" and need < available_ram_bytes() // 2:
            return None
        if not hasattr(self, "_tmp_dir"):
            import tempfile

            self._tmp_dir = tempfile.TemporaryDirectory(
                prefix="slimkit-acts-", dir=self.opts.offload_dir
            )
            log.info("cached activations (%.1f GB) offloaded to %s", need / 1e9, self._tmp_dir.name)
        return self._tmp_dir.name

    def _fit_batch(self, v, b: int):
        if isinstance(v, torch.Tensor):
            v = v.to(self.device)
            return v.expand(b, *v.shape[1:]) if v.ndim >= 2 and v.shape[0] == 1 and b > 1 else v
        if isinstance(v, tuple):
            return tuple(self._fit_batch(x, b) for x in v)
        return v

    def block_inputs(self, block: nn.Module) -> tuple[tuple, dict]:
        """The extra positional and keyword arguments ``block`` is called with (those of its
        layer type where the model has several)."""
        t = getattr(block, "_slimkit_layer_type", None)
        if t is not None and t in self.type_inputs:
            return self.type_inputs[t]
        return self.args, self.kwargs

    def call_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        args, kwargs = self.block_inputs(block)
        out = block(
            x,
            *(self._fit_batch(a, b) for a in args),
            **{k: self._fit_batch(v, b) for k, v in kwargs.items()},
        )
        return out[0] if isinstance(out, tuple) else out

    def batches(self):
        n, bs = self.calib.shape[0], self.opts.batch_size
        for i0 in range(0, n, bs):
            yield i0, min(n, i0 + bs)

    @torch.no_grad()
    def run_blocks(
        self, blocks: list[nn.Module], src: ActivationStore, dst: ActivationStore | None = None
    ) -> ActivationStore:
        """Push every cached sample of ``src`` through ``blocks``; write into ``dst`` (new store,
        shaped as the blocks' output)."""
        for i0, i1 in self.batches():
            x = src.get(i0, i1).to(self.device)
            for b in blocks:
                x = self.call_block(b, x)
            if dst is None:
                dst = self.new_store(x.shape[1:])
            dst.set(i0, i1, x)
        return dst

    @torch.no_grad()
    def collect(
        self, blocks: list[nn.Module], src: ActivationStore, modules: dict[str, nn.Module], fn
    ) -> None:
        """Run ``blocks`` over ``src`` calling ``fn(name, input_tensor)`` for every input of the
        given modules (forward pre-hooks, after any activation quantizer attached earlier).

        The forward pass of a batch stops as soon as every module has seen its input, so
        collecting the inputs of q/k/v costs a norm, not a whole block.
        """
        seen: set[str] = set()

        def hook(name: str, x: torch.Tensor) -> None:
            fn(name, x)
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop

        handles = [
            m.register_forward_pre_hook(lambda mod, args, _n=name: hook(_n, args[0]))
            for name, m in modules.items()
        ]
        try:
            for i0, i1 in self.batches():
                seen.clear()
                x = src.get(i0, i1).to(self.device)
                try:
                    for b in blocks:
                        x = self.call_block(b, x)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def head_logits(self, store: ActivationStore, i0: int, i1: int) -> torch.Tensor:
        """Logits from cached last-block outputs through the final modules (norm, head)."""
        x = store.get(i0, i1)
        for path in self.bmap.post_blocks:
            m = get_module(self.model, path)
            if m is not None:
                x = m(x)
        return x

    # ----------------------------------------------------------------------------- capture
    @torch.no_grad()
    def capture(self, kwargs_only: bool = False) -> ActivationStore | None:
        """Inputs of block 0 for every local calibration sample (and the block kwargs).

        ``kwargs_only``: run one batch just to learn the block's extra arguments (on resume)."""
        first = self.blocks[0]
        caught: dict = {}
        store = None

        def hook(module, args, kwargs):
            if self._typing:  # _capture_layer_types runs the model past block 0
                return None
            caught["x"] = args[0] if args else kwargs.pop("hidden_states")
            caught["args"] = args[1:]  # e.g. GPT-2 passes the attention mask positionally
            caught["kwargs"] = kwargs
            raise _Stop

        pre = [get_module(self.model, p) for p in self.bmap.pre_blocks]
        for m in pre:
            _to(m, self.device)
        h = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for i0, i1 in self.batches():
                batch = self.calib[i0:i1].to(self.device)
                caught.pop("x", None)
                try:
                    self.bmap.feed(self.model, batch)
                except _Stop:
                    pass
                if "x" not in caught:
                    raise SlimkitError(
                        f"the model's forward pass never reached its first block "
                        f"({self.bmap.blocks}.0); check the block map's feed"
                    )
                if self._act_shape is None:
                    self._act_shape = tuple(caught["x"].shape[1:])
                if not self.kwargs and not self.args:
                    kw = {k: v for k, v in caught["kwargs"].items() if not _is_cache(v)}
                    self.kwargs = {k: _first_row(v) for k, v in kw.items()}
                    self.args = tuple(
                        None if _is_cache(v) else _first_row(v) for v in caught["args"]
                    )
                    if self.layer_types:
                        self._capture_layer_types(batch[:1])
                if kwargs_only:
                    return None
                if store is None:
                    store = self.new_store()
                store.set(i0, i1, caught["x"])
        finally:
            h.remove()
            for m in pre:
                _to(m, "cpu")
        return store

    @torch.no_grad()
    def _capture_layer_types(self, batch: torch.Tensor) -> None:
        """The block arguments of every layer type, caught at the first block of each type (one
        sample through the blocks up to the first block of the last type to appear)."""
        self.type_inputs = {self.layer_types[0]: (self.args, self.kwargs)}
        firsts: dict[str, int] = {}
        for i, t in enumerate(self.layer_types):
            firsts.setdefault(t, i)
        last = max(firsts.values())

        def hook(i: int):
            def fn(module, args, kwargs):
                t = self.layer_types[i]
                if firsts[t] == i and t not in self.type_inputs:
                    kw = {k: _first_row(v) for k, v in kwargs.items() if not _is_cache(v)}
                    kw.pop("hidden_states", None)
                    a = tuple(None if _is_cache(v) else _first_row(v) for v in args[1:])
                    self.type_inputs[t] = (a, kw)
                if i == last:
                    raise _Stop

            return fn

        run = list(self.blocks)[: last + 1]
        pre = [get_module(self.model, p) for p in self.bmap.pre_blocks]
        handles = [
            b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(run)
        ]
        self._typing = True
        try:
            for m in run + pre:
                _to(m, self.device)
            try:
                self.bmap.feed(self.model, batch.to(self.device))
            except _Stop:
                pass
        finally:
            self._typing = False
            for h in handles:
                h.remove()
            for m in run:
                _to(m, "cpu")
        missing = sorted(set(self.layer_types) - set(self.type_inputs))
        if missing:
            raise SlimkitError(f"the forward pass never reached a block of type {missing}")

    # ----------------------------------------------------------------------------- main loop
    def run(self, method: BlockwiseMethod, *, resume: bool = False) -> BlockwisePipeline:
        self._method = method
        method.on_start(self)
        start = 0
        # names this process's checkpoint directories apart from those of a killed earlier one
        # (from the OS, so the torch RNG stream that the checkpoint restores is not touched)
        token = torch.tensor([secrets.randbits(31) if dist.rank() == 0 else 0], device=self.device)
        self._ckpt_token = f"{int(dist.all_reduce_max(token)):08x}"
        self._ckpt_files: dict[str, str] = {}  # block -> file in the current checkpoint
        if resume and self.checkpoint_dir and (self.checkpoint_dir / "progress.json").is_file():
            start, inputs_q, inputs_fp = self._load_checkpoint(method)
            self.resumed_at = start
            self.capture(kwargs_only=True)
            log.info("resuming at window %d/%d", start + 1, len(self.plan))
        else:
            inputs_q = self.capture()
            inputs_fp = None
            if method.needs_fp:
                inputs_fp = self.new_store()
                for i0, i1 in self.batches():
                    inputs_fp.set(i0, i1, inputs_q.get(i0, i1))
        fp_copies: dict[int, nn.Module] = {}
        bar = progress(total=len(self.plan), initial=start, desc="blocks", unit="window")
        for wi in range(start, len(self.plan)):
            block_ids, finalize_ids = self.plan[wi]
            for b in block_ids:
                self.blocks[b].to(self.device)
                if method.needs_fp and b not in fp_copies:
                    fp_copies[b] = _fp_copy(self.blocks[b])
            win = Window(
                index=wi,
                block_ids=block_ids,
                finalize_ids=finalize_ids,
                blocks=[self.blocks[b] for b in block_ids],
                fp_blocks=[fp_copies[b] for b in block_ids] if method.needs_fp else None,
                inputs_q=inputs_q,
                inputs_fp=inputs_fp,
                pipe=self,
            )
            method.on_window(win)
            for b in finalize_ids:
                method.on_finalize(win, b, self.blocks[b])
                inputs_q = self.run_blocks([self.blocks[b]], inputs_q)
                if method.needs_fp:
                    inputs_fp = self.run_blocks([fp_copies.pop(b)], inputs_fp)
                self.blocks[b].to("cpu")
            self._save_checkpoint(wi, method, inputs_q, inputs_fp)
            metrics = [e for e in self.log if e.get("window") == wi]
            for e in metrics:
                log.debug(
                    "window %d %s",
                    wi,
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items()
                    ),
                )
            errs = [v for e in metrics for k, v in e.items() if k.endswith("err")]
            post = {"blocks": f"{block_ids[0]}-{block_ids[-1]}"}
            if errs:
                post["mean_err"] = f"{sum(errs) / len(errs):.3g}"
            sp = [e["sparsity"] for e in metrics if "sparsity" in e]
            if sp:
                post["sparsity"] = f"{sum(sp) / len(sp):.3f}"
            bar.set_postfix(post)
            bar.update(1)
        bar.close()
        for b in self.plan[-1][0]:
            self.blocks[b].to("cpu")
        self.outputs = inputs_q  # outputs of the last block (quantized stream)
        method.on_end(self)
        return self

    # ----------------------------------------------------------------------------- checkpoint
    # A checkpoint is atomic as a whole. Each window's files (its blocks, the method state, every
    # rank's activation streams) go into a new directory ``window-NNNN-TOKEN.tmp`` that is renamed
    # when complete; then ``progress.json`` is replaced in one step: it names the file that holds
    # each block, so it is the switch from the old checkpoint to the new one. Files no longer named
    # are deleted last. A kill at any point leaves the old or the new checkpoint, never a mix (a
    # block file overwritten in place before the switch used to resume to different weights).
    def _save_checkpoint(
        self, wi: int, method: BlockwiseMethod, q: ActivationStore, fp: ActivationStore | None
    ) -> None:
        d = self.checkpoint_dir
        if d is None:
            return
        step = f"window-{wi:04d}-{self._ckpt_token}"
        tmp = d / f"{step}.tmp"
        block_ids, _ = self.plan[wi]
        if dist.rank() == 0:
            d.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a killed attempt (the token makes this unlikely)
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        if dist.rank() == 0:
            for b in block_ids:  # finalized blocks and blocks carried into the next window
                tensors, meta = self._block_state(b)
                _save(tensors, tmp / f"block_{b:04d}.safetensors", meta)
            _save(method.state_dict(), tmp / "method.safetensors")
        streams = {"q": q.all().contiguous()}
        if fp is not None:
            streams["fp"] = fp.all().contiguous()
        streams["rng"] = torch.get_rng_state()
        _save(streams, tmp / f"streams_rank{dist.rank()}.safetensors")
        dist.barrier()
        if dist.rank() == 0:
            os.replace(tmp, d / step)
            files = dict(self._ckpt_files)
            files.update({str(b): f"{step}/block_{b:04d}.safetensors" for b in block_ids})
            prog = {
                "next_window": wi + 1,
                "n_blocks": len(self.blocks),
                "window": self.opts.window,
                "overlap": self.opts.overlap,
                "n_samples": self.n_total,
                "world_size": dist.world_size(),
                "identity": self.identity,
                "elapsed_seconds": self.prior_seconds + time.time() - self._t_start,
                # where this checkpoint's files are (relative to the checkpoint directory)
                "files": {
                    "blocks": files,
                    "method": f"{step}/method.safetensors",
                    "streams": f"{step}/streams_rank{{rank}}.safetensors",
                },
            }
            _write_json(d / "progress.json", prog)  # the switch
            self._ckpt_files = files
            _remove_unreferenced(d, prog["files"])
        dist.barrier()

    def _block_state(self, b: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A block's weights plus what registered :class:`BlockState` s keep beside them."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.blocks[b].state_dict().items()}
        meta: dict[str, str] = {}
        for state in BLOCK_STATES:
            t, m = state.save(self, b)
            tensors.update(t)
            meta.update(m)
        return tensors, meta

    def _load_checkpoint(self, method: BlockwiseMethod):
        d = self.checkpoint_dir
        prog = json.loads((d / "progress.json").read_text())
        expect = {
            "n_blocks": len(self.blocks),
            "window": self.opts.window,
            "overlap": self.opts.overlap,
            "n_samples": self.n_total,
            "world_size": dist.world_size(),
            "identity": json.loads(json.dumps(self.identity)),
        }
        for k, v in expect.items():
            old = prog.get(k)
            if old != v:
                if isinstance(v, dict) and isinstance(old, dict):  # name what differs
                    flat_old, flat_new = _flatten(old), _flatten(v)
                    keys = sorted(
                        x
                        for x in flat_old.keys() | flat_new.keys()
                        if flat_old.get(x) != flat_new.get(x)
                    )
                    k, old, v = (
                        ", ".join(keys),
                        [flat_old.get(x) for x in keys],
                        [flat_new.get(x) for x in keys],
                    )
                raise SlimkitError(
                    f"cannot resume: the checkpoint was made with {k}={old}, this run has {v}; "
                    "rerun without --resume to start over"
                )
        start = prog["next_window"]
        self.prior_seconds = float(prog.get("elapsed_seconds", 0.0))
        files = prog.get("files")
        if files is None:  # block files replaced in place: it may mix two windows
            raise SlimkitError(
                f"cannot resume: {d} holds a checkpoint in the older, non-atomic layout; "
                "rerun without --resume to start over"
            )
        self._ckpt_files = dict(files["blocks"])
        if dist.rank() == 0:  # what a write killed after the switch left behind
            _remove_unreferenced(d, files)
        touched = sorted({b for w in self.plan[:start] for b in w[0]})
        missing = [b for b in touched if str(b) not in files["blocks"]]
        if missing:
            raise SlimkitError(
                f"cannot resume: {d / 'progress.json'} names no file for blocks {missing}; "
                "rerun without --resume to start over"
            )
        for b in touched:
            tensors, meta = _load(d / files["blocks"][str(b)])
            state = {k: v for k, v in tensors.items() if not k.startswith("@")}
            self.blocks[b].load_state_dict(state)
            unknown = set(meta)
            for extra in BLOCK_STATES:
                unknown -= extra.load(self, b, tensors, meta)
            if unknown:
                raise SlimkitError(
                    f"cannot resume: {files['blocks'][str(b)]} holds state that no loaded package "
                    f"reads ({', '.join(sorted(unknown)[:3])}); rerun without --resume"
                )
        method_file = d / files["method"]
        method.load_state_dict(load_file(method_file) if method_file.is_file() else {})
        streams = load_file(d / files["streams"].format(rank=dist.rank()))
        q = self.new_store(streams["q"].shape[1:])
        q.set(0, q.n, streams["q"])
        fp = None
        if "fp" in streams:
            fp = self.new_store(streams["fp"].shape[1:])
            fp.set(0, fp.n, streams["fp"])
        torch.set_rng_state(streams["rng"])
        return start, q, fp


def _to(m: nn.Module | nn.Parameter | None, device) -> None:
    """Move a pre-block module, or a parameter such as a ViT's ``pos_embed``, in place."""
    if isinstance(m, nn.Parameter):
        m.data = m.data.to(device)
    elif m is not None:
        m.to(device)


def _fp_copy(block: nn.Module) -> nn.Module:
    """A frozen copy of a block without activation quantizers or instance-level forward
    overrides (a resumed block may carry them from its checkpoint)."""
    c = copy.deepcopy(block).requires_grad_(False)
    for state in BLOCK_STATES:
        state.strip(c)
    for m in c.modules():
        m.__dict__.pop("forward", None)
    return c


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta or None)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


_CHECKPOINT_FILE = re.compile(r"(block_\d+|method|streams_rank\d+)\.(safetensors|tmp)")


def _remove_unreferenced(d: Path, files: dict) -> None:
    """Delete the files of earlier checkpoints that ``files`` (the new checkpoint) does not
    name: whole ``window-*`` directories, single files in a directory that still holds a named
    block, and the flat files of the pre-atomic layout."""
    keep = set(files["blocks"].values()) | {files["method"]}
    keep_dirs = {Path(f).parent.name for f in keep}
    for p in sorted(d.iterdir()):
        if p.is_dir() and p.name.startswith("window-"):
            if p.name not in keep_dirs:
                shutil.rmtree(p)
                continue
            for f in sorted(p.iterdir()):
                if f"{p.name}/{f.name}" not in keep and not (
                    p.name == Path(files["method"]).parent.name and f.name.startswith("streams_")
                ):
                    f.unlink()
        elif p.is_file() and _CHECKPOINT_FILE.fullmatch(p.name):
            p.unlink()


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_cache(v) -> bool:
    return type(v).__name__.endswith("Cache")


def _first_row(v):
    """Keep batch-independent kwargs as batch 1 (they are expanded per batch later)."""
    if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] > 1:
        return v[:1].clone()
    if isinstance(v, tuple):
        return tuple(_first_row(x) for x in v)
    return v
