"""Worker-side weight loading for vLLM, imported inside vLLM's worker process.

vLLM names this class in ``worker_extension_cls``; the worker imports this module
before it loads the model, which is early enough to change how CPU linear layers are
packed.

Why the patch: on CPU, vLLM packs each linear weight into a oneDNN/sgl kernel handle
and then replaces the parameter with an empty tensor (``remove_weight=True``). After
that, ``model.load_weights`` has nowhere to write, and the packed handles keep the old
weights. Keeping the parameter (``remove_weight=False``) costs a second copy of the
linear weights, and lets an update load new tensors and then rebuild the packed handles
with ``process_weights_after_loading``. On GPU the patch is a no-op.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch


def _patch_cpu_gemm_dispatch() -> None:
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_rlhf_keeps_weight", False):
        return

    def keep_weight_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    keep_weight_dispatch._rlhf_keeps_weight = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = keep_weight_dispatch


_patch_cpu_gemm_dispatch()


class WeightUpdateExtension:
    """Mixed into vLLM's worker class; methods are called through ``collective_rpc``."""

    # LoRA state (the mixin has no __init__ of its own; these are only ever reassigned).
    _rlhf_lora_base_dir: str | None = None
    _rlhf_lora_base: dict = {}  # name -> base tensor that adapters merge onto
    _rlhf_lora_scratch: torch.Tensor | None = None  # float32 merge buffer
    # Names served with an adapter merged in; None = unknown (after a full load).
    _rlhf_lora_merged: frozenset | None = frozenset()

    def rlhf_load_weights(self, checkpoint_dir: str) -> dict:
        """Load every safetensors file of checkpoint_dir into the running model."""
        from safetensors.torch import load_file
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        t0 = time.perf_counter()
        model = self.model_runner.model  # type: ignore[attr-defined]
        files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {checkpoint_dir!r}")
        n = 0
        for f in files:
            tensors = load_file(str(f))
            n += len(tensors)
            model.load_weights(weights=tensors.items())
        device = next(model.parameters()).device
        process_weights_after_loading(model, self.model_runner.model_config, device)  # type: ignore[attr-defined]
        # Any weight may now differ from the LoRA base: the next adapter restores them all.
        self._rlhf_lora_merged = None
        return {"tensors": n, "seconds": time.perf_counter() - t0}

    def rlhf_prepare_lora(self, base_dir: str) -> dict:
        """Read the base weights that adapters are merged onto, ahead of the first adapter."""
        t0 = time.perf_counter()
        base = self._lora_base(base_dir)
        self._lora_scratch(max(w.numel() for n, w in base.items() if w.ndim == 2 and "embed" not in n))
        return {"tensors": len(base), "seconds": time.perf_counter() - t0}

    def _lora_base(self, base_dir: str) -> dict:
        from safetensors.torch import load_file

        if self._rlhf_lora_base_dir != base_dir:
            base: dict = {}
            for f in sorted(Path(base_dir).glob("*.safetensors")):
                # Copies the tensors out of the file's memory map, so merges never page-fault.
                base.update({k: v.clone() for k, v in load_file(str(f)).items()})
            if not base:
                raise FileNotFoundError(f"no *.safetensors in {base_dir!r}")
            self._rlhf_lora_base, self._rlhf_lora_base_dir = base, base_dir
        return self._rlhf_lora_base

    def _lora_scratch(self, numel: int) -> torch.Tensor:
        """A float32 buffer of at least numel elements, kept between updates."""
        scratch = self._rlhf_lora_scratch
        if scratch is None or scratch.numel() < numel:
            scratch = self._rlhf_lora_scratch = torch.zeros(numel, dtype=torch.float32)  # zeros: touch every page
        return scratch

    def rlhf_load_lora(self, base_dir: str, adapter_dir: str) -> dict:
        """Serve base + a PEFT LoRA adapter, merged: W = W_base + scale * B @ A.

        Every adapter version is merged onto the same base (versions never stack); a weight
        that the previous adapter changed and this one does not is put back to the base.
        The sum is formed in float32 (in a scratch buffer kept between updates) and rounded
        once to the serving dtype, so the result equals merging in float32 by hand. Only the
        layers that hold changed weights are re-packed.
        """
        from safetensors.torch import load_file
        from vllm.model_executor.layers.linear import LinearBase

        t0 = time.perf_counter()
        model = self.model_runner.model  # type: ignore[attr-defined]
        base = self._lora_base(base_dir)
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter = {}
        for f in sorted(Path(adapter_dir).glob("*.safetensors")):
            adapter.update(load_file(str(f)))
        pairs = {}
        for key, a in adapter.items():
            if ".lora_A." not in key:
                continue
            b = adapter.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise ValueError(f"adapter {adapter_dir!r} has {key!r} without its lora_B")
            module = key.split(".lora_A.")[0]
            if module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            name = module + ".weight"
            if name not in base:
                raise ValueError(f"adapter targets {name!r}, which the base model {base_dir!r} does not have")
            if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(base[name].shape):
                raise ValueError(f"adapter {key!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not match "
                                 f"{name!r} {tuple(base[name].shape)}")
            pairs[name] = (a, b)
        if not pairs:
            raise ValueError(f"no lora_A/lora_B pairs in {adapter_dir!r}")
        t_read = time.perf_counter()

        scratch = self._lora_scratch(max(base[n].numel() for n in pairs))

        def merged():
            # One weight at a time: vLLM's loader copies each into its parameter before taking
            # the next, so the freed buffer is reused for the next one.
            for name, (a, b) in pairs.items():
                w = base[name]
                acc = scratch[: w.numel()].view(w.shape)
                acc.copy_(w)
                acc.addmm_(b.float(), a.float(), alpha=scale)
                yield name, acc.to(w.dtype)

        everything = self._rlhf_lora_merged is None
        changed = set(base) if everything else self._rlhf_lora_merged
        restored = {n: base[n] for n in changed - pairs.keys()}
        model.load_weights(weights=itertools.chain(merged(), restored.items()))
        self._rlhf_lora_merged = frozenset(pairs)
        t_load = time.perf_counter()
        # Re-pack only the layers that hold changed weights: the embedding and LM head (the
        # largest matrices) are untouched by an adapter, so they keep their packed handles.
        repacked = 0
        if everything:
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            process_weights_after_loading(model, self.model_runner.model_config,  # type: ignore[attr-defined]
                                          next(model.parameters()).device)
            repacked = -1  # all
        else:
            prefixes = tuple({n.rsplit(".", 2)[0] + "." for n in (*pairs, *restored)})
            for mod_name, module in model.named_modules():
                method = getattr(module, "quant_method", None)
                if (isinstance(module, LinearBase) and method is not None
                        and (mod_name + ".").startswith(prefixes)):
                    method.process_weights_after_loading(module)
                    repacked += 1
        t_end = time.perf_counter()
        return {"tensors": len(pairs), "restored": len(restored), "repacked": repacked, "seconds": t_end - t0,
                "phases": {"read": t_read - t0, "merge_load": t_load - t_read, "repack": t_end - t_load}}
