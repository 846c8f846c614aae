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
        return {"tensors": n, "seconds": time.perf_counter() - t0}

    def rlhf_load_lora(self, base_dir: str, adapter_dir: str) -> dict:
        """Serve base + a PEFT LoRA adapter, merged: W = W_base + scale * B @ A.

        The base tensors are read once and kept, so every adapter version is merged onto the
        same base (versions never stack). Only the adapted weights are reloaded.
        """
        from safetensors.torch import load_file
        from vllm.model_executor.layers.linear import LinearBase

        t0 = time.perf_counter()
        model = self.model_runner.model  # type: ignore[attr-defined]
        base = getattr(self, "_rlhf_lora_base", None)
        if base is None or getattr(self, "_rlhf_lora_base_dir", None) != base_dir:
            base = {}
            for f in sorted(Path(base_dir).glob("*.safetensors")):
                base.update(load_file(str(f)))
            self._rlhf_lora_base, self._rlhf_lora_base_dir = base, base_dir
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        adapter = {}
        for f in sorted(Path(adapter_dir).glob("*.safetensors")):
            adapter.update(load_file(str(f)))
        merged = {}
        for key, a in adapter.items():
            if ".lora_A." not in key:
                continue
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            module = key.split(".lora_A.")[0]
            if module.startswith("base_model.model."):
                module = module[len("base_model.model."):]
            name = module + ".weight"
            if name not in base:
                raise KeyError(f"adapter targets {name!r}, which the base model {base_dir!r} does not have")
            w = base[name]
            merged[name] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        if not merged:
            raise ValueError(f"no lora_A/lora_B pairs in {adapter_dir!r}")
        model.load_weights(weights=merged.items())
        # Re-pack only the layers that hold adapted weights: the embedding and LM head (the
        # largest matrices) are untouched by an adapter, so they keep their packed handles.
        prefixes = tuple({name.rsplit(".", 2)[0] + "." for name in merged})
        repacked = 0
        for mod_name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if isinstance(module, LinearBase) and method is not None and (mod_name + ".").startswith(prefixes):
                method.process_weights_after_loading(module)
                repacked += 1
        return {"tensors": len(merged), "repacked": repacked, "seconds": time.perf_counter() - t0}
