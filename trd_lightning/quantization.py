"""A quantized frozen teacher through bitsandbytes (8-bit LLM.int8 or 4-bit NF4), from YAML.

``DistillationModule(teacher_quantization={"load_in_4bit": True})`` ends up here through
`trd_lightning.models.load_causal_lm`. The teacher is only ever run forward under ``no_grad``, so
quantizing it costs accuracy of its logits (measured on a tiny Llama: within ~0.01 for 8-bit and
~0.4 for NF4) but no training instability, and it roughly quarters the teacher's memory (NF4).

Support is probed, not assumed: a tiny quantize round trip on the target device runs before any
weights are loaded, so "bitsandbytes cannot run here" surfaces as one clear error at construction.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")


def _import_bitsandbytes():
    """Imported lazily (an optional dependency); a function so tests can simulate its absence."""
    import bitsandbytes

    return bitsandbytes


def quantization_device() -> torch.device:
    """Where the quantized teacher lives: this process's GPU, else the CPU.

    Quantized weights cannot be moved after loading, so they are placed on the rank's own device
    at load time (``LOCAL_RANK`` is set by Lightning's launcher and torchrun).
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_bitsandbytes(bits: int, device: torch.device | None = None) -> None:
    """Raise a clear error unless bitsandbytes is installed and can quantize on ``device``."""
    device = device or quantization_device()
    try:
        bnb = _import_bitsandbytes()
    except ImportError as err:
        raise ImportError(
            f"a {bits}-bit teacher needs bitsandbytes, which is not installed ({err}); "
            "install it with `pip install bitsandbytes` (or `pip install -e '.[scale]'`), "
            "or drop teacher_quantization to load the teacher unquantized"
        ) from None
    # int8 kernels take half precision on CUDA (float32 raises "A must be float16"), as real
    # weights do there; the CPU backend takes float32.
    x = torch.randn(4, 64, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    try:
        if bits == 4:
            q, state = bnb.functional.quantize_4bit(x, quant_type="nf4", blocksize=64)
            bnb.functional.dequantize_4bit(q, state)
        else:
            bnb.functional.int8_vectorwise_quant(x)
    except Exception as err:  # any backend failure means the same thing to the user
        version = getattr(bnb, "__version__", "?")
        raise RuntimeError(
            f"bitsandbytes {version} cannot run {bits}-bit quantization on {device.type} here "
            f"({type(err).__name__}: {err}); use a CUDA GPU or a bitsandbytes build with {device.type} "
            "support (>= 0.45 for CPU), or drop teacher_quantization"
        ) from None


#: bitsandbytes' 4-bit block size on the CPU: its matmul reshapes each quantized weight into
#: blocks along the input dimension, so a layer whose input width is not a multiple of it fails
#: at its first forward ("shape '[96, 1]' is invalid for input of size 144"), not at load.
CPU_4BIT_BLOCK = 64


def probe_quantized_model(model: torch.nn.Module, bits: int) -> None:
    """Run the loaded quantized model once on two tokens, so a kernel that cannot handle one of its
    real layer shapes fails here, before any compute, naming the layers and the rule.

    The import-time probe (`check_bitsandbytes`) only shows that the backend runs at all; which
    layer widths it accepts depends on the backend and its version (earlier CPU builds needed 4-bit
    input widths that are multiples of 64; bitsandbytes 0.50.2 runs 96), so the model's own layers
    are what count.
    """
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except Exception as err:
        bnb = _import_bitsandbytes()
        layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
        odd = [
            f"{name} (in_features {m.in_features})"
            for name, m in model.named_modules()
            if isinstance(m, layer_type) and m.in_features % CPU_4BIT_BLOCK
        ]
        rule = (
            f"; on {device.type} the {bits}-bit kernel needs every quantized layer's input width to be a multiple of "
            f"{CPU_4BIT_BLOCK}, and these are not: {', '.join(odd[:6])}{' ...' if len(odd) > 6 else ''}. Keep them in full "
            "precision with teacher_quantization.skip_modules, use load_in_8bit, or a GPU"
            if odd
            else ""
        )
        raise RuntimeError(
            f"the {bits}-bit quantized teacher fails its first forward on {device.type} "
            f"({type(err).__name__}: {err}){rule}"
        ) from None


def bitsandbytes_config(
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: str = "bfloat16",
    bnb_4bit_use_double_quant: bool = True,
    llm_int8_threshold: float = 6.0,
    skip_modules: list[str] | None = None,
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a bitsandbytes-quantized model.

    Exactly one of ``load_in_8bit`` / ``load_in_4bit``. ``skip_modules`` stay in full precision
    (default: the LM head, whose logits are the distillation target).
    """
    if load_in_8bit == load_in_4bit:
        raise ValueError(
            "teacher_quantization needs exactly one of load_in_8bit: true or load_in_4bit: true, "
            f"got load_in_8bit={load_in_8bit}, load_in_4bit={load_in_4bit}"
        )
    if bnb_4bit_quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {bnb_4bit_quant_type!r}")
    if bnb_4bit_compute_dtype not in _DTYPES:
        raise ValueError(f"bnb_4bit_compute_dtype must be one of {sorted(_DTYPES)}, got {bnb_4bit_compute_dtype!r}")
    bits = 4 if load_in_4bit else 8
    device = quantization_device()
    check_bitsandbytes(bits, device)

    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=_DTYPES[bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        llm_int8_threshold=llm_int8_threshold,
        llm_int8_skip_modules=list(skip_modules) if skip_modules is not None else ["lm_head"],
    )
    return {"quantization_config": config, "device_map": {"": str(device)}}
