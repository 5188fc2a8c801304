"""Memory planner: predict the peak memory of a training run from the model's config alone.

Every term is a formula over the model's shape and the run's settings, so a 70B config plans in seconds with no
weights. The terms model what the run actually does with this toolkit's stack (TRL trainers, PEFT LoRA, bitsandbytes,
bf16 autocast over fp32 weights on CPU, bf16 weights on GPU), and are checked against measured peaks by
`benchmarks/estimate_accuracy.py`.

A step has three moments that can hold the peak, and the plan takes the largest:
- load: the weights (safetensors are mapped, so a matching dtype costs no second copy);
- forward/backward: what persists (weights, adapter, optimizer states) plus saved activations, autocast weight
  copies, the loss head's working set and the gradients;
- optimizer step: what persists plus gradients plus the optimizer's temporaries.
A method that samples during training (grpo) has two more:
- sampling: what persists plus the KV cache of a whole generation batch, one layer's transients and the last
  position's logits (TRL samples with transformers' generate, under no_grad, between optimizer steps);
- scoring: what persists (a reward model's weights among it, `--reward rm:DIR`) plus its no-grad forward.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from align.core.errors import AlignError
from align.core.reference import ReferenceMode

KiB, MiB, GiB = 1024, 1024**2, 1024**3
Stage = str
"""A training method's name (align.train.methods.METHODS), whose traits shape the plan."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# TRL's fused LM head (`trl.kernels.chunked_logprob`) projects at most this many tokens by this many vocabulary
# columns at a time; on devices without Triton it folds each tile with torch ops in fp32.
HEAD_TOKEN_CHUNK = 4096
HEAD_VOCAB_CHUNK = 32768
# fp32 tile-sized temporaries alive at once in the torch fallback of the head's backward. Counting
# `_backward_tile` gives 8 (tile.float(), y, z, log_p, p, grad, the one-hot as float and its difference with p);
# the measured peaks (benchmarks/estimate_accuracy.py, 256 to 1024 tokens) fit 10, the other two being the
# product with grad_logprobs and `_addmm_fp32`'s fp32 copy of the tile overlapping the last ones. On GPU the Triton
# kernel works in place, so only the compute-dtype tile remains.
HEAD_FP32_TEMPORARIES_CPU = 10

# bitsandbytes NF4: 4 bits per weight plus one absmax per 64-weight block, fp32 (4 B) or, with double
# quantization, 8-bit (1 B) with one fp32 constant per 256 blocks.
NF4_BLOCK = 64
NF4_DQ_BLOCKS = 256
# bitsandbytes 8-bit optimizers keep one fp32 absmax per 256-value block of each state (two states for Adam).
BNB_OPTIM_BLOCK = 256

# Measured on the 2-core CPU machine in benchmarks/estimate_accuracy.py (see benchmarks/RESULTS.md): what the trainer,
# dataset, accelerate and glibc's per-thread malloc arenas add above the post-import baseline before any tensor.
CPU_FRAMEWORK_OVERHEAD = 80 * MiB
# The CUDA context is outside `torch.cuda.max_memory_allocated` but inside what `nvidia-smi` shows, so on CUDA the
# plan predicts the allocator's peak (what the benchmarks measure) and `available_memory` leaves the context out.
CUDA_CONTEXT = 500 * MiB


# ---- model shape -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearGroup:
    """One linear module of every decoder layer (e.g. `self_attn.q_proj`), as `in_features x out_features`."""

    name: str
    in_features: int
    out_features: int
    count: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.count


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a causal LM, counted exactly from a meta-device instance."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    total_params: int
    embedding_params: int
    lm_head_params: int
    """0 when tied to the embeddings."""
    layer_linears: tuple[LinearGroup, ...]
    """The linear modules inside the decoder layers (what LoRA targets and bitsandbytes quantizes)."""
    stored_dtype: str = "float32"
    """The checkpoint's dtype as its config declares it."""
    experts_per_token: int = 1
    """A mixture's experts per token (Mixtral's num_experts_per_tok): each token runs that many expert MLPs. Its
    experts are fused 3D parameters and its routers bare weights, so both count in `other_params`, not as linears."""
    module_params: tuple[tuple[str, int], ...] = ()
    """Parameters per module name (in-layer suffix such as `mlp.gate`, or top-level path), summed over layers:
    what lora.modules_to_save trains whole."""

    @property
    def layer_linear_params(self) -> int:
        return sum(g.params for g in self.layer_linears)

    @property
    def other_params(self) -> int:
        """Norms, biases outside linears and anything else neither quantized nor a layer linear."""
        return self.total_params - self.layer_linear_params - self.embedding_params - self.lm_head_params


def shape_from_config(config: Any) -> ModelShape:
    """Count parameters per module on the meta device: exact counts, no memory, seconds even for 70B."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise AlignError(f"cannot plan {config.model_type}: not a causal LM ({str(exc).splitlines()[0]})") from None
    return shape_from_model(model, config)


def shape_from_model(model: Any, config: Any) -> ModelShape:
    import torch

    groups: dict[str, list[int]] = {}
    modules: dict[str, int] = {}
    embedding = lm_head = 0
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters())
        if name and own:
            key = _layer_suffix(name) or name
            modules[key] = modules.get(key, 0) + own
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear):
            suffix = _layer_suffix(name)
            if suffix is not None:
                entry = groups.setdefault(suffix, [module.in_features, module.out_features, 0])
                entry[2] += 1
        elif isinstance(module, torch.nn.Embedding):
            embedding += module.weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if output is not None and not tied:
        lm_head = sum(p.numel() for p in output.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        model_type=str(text.model_type),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        vocab=text.vocab_size,
        tied_embeddings=tied,
        total_params=sum(p.numel() for p in model.parameters()),
        embedding_params=embedding,
        lm_head_params=lm_head,
        layer_linears=tuple(LinearGroup(k, v[0], v[1], v[2]) for k, v in groups.items()),
        stored_dtype=_stored_dtype(config),
        experts_per_token=int(getattr(text, "num_experts_per_tok", None) or 1),
        module_params=tuple(modules.items()),
    )


def _stored_dtype(config: Any) -> str:
    value = getattr(config, "dtype", None) or "float32"  # transformers 5 name (`torch_dtype` is deprecated)
    name = str(value).removeprefix("torch.")
    return name if name in DTYPE_BYTES else "float32"


def _layer_suffix(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`; None outside numbered layers."""
    match = re.search(r"\.\d+\.(.+)$", name)
    return match.group(1) if match else None


def load_shape(spec: str) -> ModelShape:
    """The shape of what `--model` names, reading only its config (an adapter spec plans its base). GGUF files
    (and the embedded alias) are read for their metadata only, without the one-time conversion to safetensors."""
    from transformers import AutoConfig

    from align.core.models import EMBEDDED_ALIAS, embedded_gguf_path, resolve_model

    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {}
    if spec == EMBEDDED_ALIAS or spec.endswith(".gguf"):
        gguf = embedded_gguf_path() if spec == EMBEDDED_ALIAS else path
        if not gguf.is_file():
            raise AlignError(f"model file not found: {spec}")
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif path.is_dir() and (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        source = str(path)
    else:
        source = resolve_model(spec).base
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignError(f"cannot read the config of {spec}: {first}") from None
    return shape_from_config(config)


# ---- settings ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModelShape:
    """A reward model a GRPO run scores with (`--reward rm:DIR`): its base's shape and its adapter's size."""

    name: str
    shape: ModelShape
    adapter_params: int
    """LoRA plus PEFT's trainable copy of the score head (modules_to_save), loaded unmerged."""

    @property
    def params(self) -> int:
        """As a one-output sequence classifier: the base without its LM head, a hidden x 1 score head, the adapter."""
        return self.shape.total_params - self.shape.lm_head_params + self.shape.hidden + self.adapter_params


@dataclass(frozen=True)
class TrainSetup:
    """The settings that decide memory, named as TRL / PEFT name them where they can be."""

    stage: Stage = "sft"
    device: Literal["cpu", "cuda"] = "cpu"
    weights_dtype: str = "float32"
    """The dtype parameters are stored in (float32, bfloat16, float16)."""
    autocast: bool = False
    """bf16 autocast over the weights (what `--dtype auto` does on CPUs with fast bf16)."""
    quantize: Literal["4bit", "8bit"] | None = None
    double_quant: bool = True
    lora_r: int | None = 16
    """None: full fine-tuning."""
    lora_targets: str | tuple[str, ...] = "all-linear"
    """Empty: no LoRA matrices (only `modules_to_save` train)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained whole (PEFT keeps the frozen original beside the trainable copy)."""
    lora_dropout: float = 0.05
    optim: str = "adamw_torch"
    batch_size: int = 1
    max_length: int = 1024
    grad_accum: int = 1
    """Does not change a step's peak; kept so suggestions preserve the effective batch."""
    gradient_checkpointing: bool = False
    attn: str = "sdpa"
    ref: ReferenceMode = "adapter"
    """Only `model` costs memory of its own (a second copy of the weights); a fresh LoRA against the base (`base`)
    plans as `adapter` does, and precompute's one-off reference pass is not the peak."""
    num_processes: int = 1
    zero: Literal[0, 2, 3] = 0
    chunked_loss: bool = True
    """TRL's fused LM head (its default): log-probs in tiles instead of the full logits tensor."""
    max_completion_length: int = 256
    """Methods that sample (grpo): tokens sampled per completion (TRL's default); `max_length` is a prompt plus
    these."""
    steps_per_generation: int | None = None
    """Methods that sample: micro-batches one generation batch feeds (None: grad_accum, TRL's default)."""
    reward_models: tuple[RewardModelShape, ...] = ()
    """Methods that sample: reward models scoring the completions, each a second model held in memory."""

    @property
    def full(self) -> bool:
        return self.lora_r is None

    @property
    def method(self) -> Any:
        from align.train.methods import METHODS

        return METHODS[self.stage]

    @property
    def active_lora_dropout(self) -> float:
        """The preference trainers' `disable_dropout=True` (their default) zeroes every dropout module, LoRA's
        included."""
        return 0.0 if self.method.disables_dropout else self.lora_dropout

    @property
    def compute_bytes(self) -> int:
        """Bytes of activations: bf16 under autocast or quantized compute, else the weights' dtype."""
        return 2 if self.autocast or self.quantize else DTYPE_BYTES[self.weights_dtype]

    @property
    def residual_bytes(self) -> int:
        """The residual stream keeps the dtype of the non-quantized weights (fp32 under CPU autocast)."""
        return DTYPE_BYTES[self.weights_dtype]

    @property
    def sequences(self) -> int:
        """Sequences in one micro-batch forward: a preference pair puts chosen and rejected through together."""
        return self.batch_size * self.method.sequences_per_row

    @property
    def tokens(self) -> int:
        return self.sequences * self.max_length

    @property
    def generation_batch(self) -> int:
        """Completions sampled at once (TRL's generation_batch_size per process): one generate call feeds
        `steps_per_generation` micro-batches, each prompt's num_generations completions among them."""
        return self.batch_size * (self.steps_per_generation or self.grad_accum)

    @property
    def prompt_length(self) -> int:
        return self.max_length - self.max_completion_length


def check_setup(setup: TrainSetup) -> None:
    from align.train.methods import method_of

    method_of(setup.stage)
    if setup.weights_dtype not in DTYPE_BYTES:
        raise AlignError(f"unknown weights dtype '{setup.weights_dtype}' (choose {', '.join(DTYPE_BYTES)})")
    for name in ("batch_size", "max_length", "grad_accum", "num_processes", "max_completion_length"):
        if getattr(setup, name) < 1:
            raise AlignError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(setup, name)})")
    if setup.steps_per_generation is not None and setup.steps_per_generation < 1:
        raise AlignError(f"--steps-per-generation must be at least 1 (got {setup.steps_per_generation})")
    if setup.method.samples and setup.prompt_length < 1:
        raise AlignError(f"--max-length {setup.max_length} leaves no prompt beside --max-completion-length "
                         f"{setup.max_completion_length} (it counts the prompt and the completion)")
    if setup.lora_r is not None and setup.lora_r < 1:
        raise AlignError(f"--lora-r must be at least 1 (got {setup.lora_r})")
    if setup.zero not in (0, 2, 3):
        raise AlignError(f"--zero {setup.zero}: choose 0, 2 or 3")
    if setup.quantize and setup.full:
        raise AlignError("--quantize needs LoRA: a quantized base cannot be fully fine-tuned (drop --full)")
    if optimizer_bytes_per_param(setup.optim, 4) is None:
        raise AlignError(f"unknown --optim '{setup.optim}' (choose {', '.join(OPTIMIZERS)})")
    if setup.attn not in ATTENTION:
        raise AlignError(f"unknown --attn '{setup.attn}' (choose {', '.join(ATTENTION)})")


ATTENTION = ("sdpa", "eager", "flash", "flash_attention_2", "flash_attention_3", "flex_attention")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "adafactor", "sgd")


# ---- terms -------------------------------------------------------------------------------------------------------

Phase = Literal["load", "persistent", "forward_backward", "optimizer_step", "sampling", "scoring"]
MOMENTS: tuple[Phase, ...] = ("load", "forward_backward", "optimizer_step", "sampling", "scoring")
"""The phases that can hold the peak (`persistent` is part of every one but load)."""


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    phase: Phase
    formula: str


def lora_params(shape: ModelShape, r: int, targets: str | tuple[str, ...] = "all-linear") -> int:
    """LoRA adds A (r x in) and B (out x r) to every targeted linear: r * (in + out) each."""
    return sum(r * (g.in_features + g.out_features) * g.count for g in lora_groups(shape, targets))


def lora_groups(shape: ModelShape, targets: str | tuple[str, ...] | list[str]) -> list[LinearGroup]:
    """PEFT's matching: `all-linear` is every linear but the output head; a list matches name suffixes; a string
    is a regex over the full name (here: over the in-layer part)."""
    if targets == "all-linear":
        return list(shape.layer_linears)
    if not targets:
        return []
    if isinstance(targets, str):
        return [g for g in shape.layer_linears if re.fullmatch(targets, g.name) or re.search(targets + "$", g.name)]
    wanted = set(targets)
    return [g for g in shape.layer_linears if g.name.split(".")[-1] in wanted or g.name in wanted]


def weight_bytes(shape: ModelShape, setup: TrainSetup) -> tuple[int, str]:
    """Base weights: the layer linears quantized when asked (embeddings, head and norms never are)."""
    element = DTYPE_BYTES[setup.weights_dtype]
    unquantized = shape.total_params - shape.layer_linear_params
    if setup.quantize is None:
        return shape.total_params * element, f"{shape.total_params:,} params x {element} B ({setup.weights_dtype})"
    linear = shape.layer_linear_params
    if setup.quantize == "4bit":
        # constants: per 64-block absmax, fp32 or 8-bit with a second-level fp32 per 256 blocks
        constants = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCKS) if setup.double_quant else 4 / NF4_BLOCK
        per_param = 0.5 + constants
        quantized = math.ceil(linear * per_param)
        how = f"{linear:,} linear params x {per_param:.4f} B (NF4 + block constants)"
    else:
        # LLM.int8: one byte per weight plus an fp32 scale per output row
        rows = sum(g.out_features * g.count for g in shape.layer_linears)
        quantized = linear + 4 * rows
        how = f"{linear:,} linear params x 1 B + {rows:,} row scales x 4 B (int8)"
    return quantized + unquantized * element, f"{how} + {unquantized:,} others x {element} B"


def trainable_params(shape: ModelShape, setup: TrainSetup) -> int:
    if setup.full:
        return shape.total_params
    return lora_params(shape, setup.lora_r or 0, setup.lora_targets) + saved_module_params(shape, setup)


def saved_module_params(shape: ModelShape, setup: TrainSetup) -> int:
    """Parameters of the modules trained whole, matched as PEFT matches modules_to_save (a path ending with the
    name); a name matching nested modules counts the outermost only."""
    if setup.full or not setup.modules_to_save:
        return 0
    matched = [name for name, _ in shape.module_params if any(name.endswith(e) for e in setup.modules_to_save)]
    outer = [n for n in matched if not any(n != m and n.startswith(m + ".") for m in matched)]
    return sum(count for name, count in shape.module_params if name in outer)


def trainable_bytes_per_param(setup: TrainSetup) -> int:
    """PEFT keeps adapter weights in fp32 even over a bf16 base (`autocast_adapter_dtype`); full FT trains the
    weights in their own dtype. Over a quantized base TRL casts the adapter to bf16 (QLoRA's recipe); counted on
    CUDA only, where it was derived, so the CPU figures stay those measured in benchmarks/RESULTS.md."""
    if setup.quantize and setup.device == "cuda" and not setup.full:
        return 2
    return DTYPE_BYTES[setup.weights_dtype] if setup.full else 4


def optimizer_bytes_per_param(optim: str, param_bytes: int) -> float | None:
    """Optimizer state per trainable parameter. Adam: m and v in the parameter's dtype; bitsandbytes 8-bit: one
    byte each plus an fp32 absmax per 256 values; Adafactor: factored second moment (about nothing per param);
    SGD without momentum: none. Paged variants hold the same bytes, in memory the driver can evict to the host."""
    optim = optim.lower()
    if optim in ("adamw_torch", "adamw_torch_fused", "adamw", "paged_adamw_32bit"):
        return 2.0 * param_bytes
    if optim in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"):
        return 2.0 * (1 + 4 / BNB_OPTIM_BLOCK)
    if optim == "adafactor":
        return 0.0
    if optim == "sgd":
        return 0.0
    return None


def optimizer_step_temporaries(setup: TrainSetup, shape: ModelShape, trainable: int, param_bytes: int) -> int:
    """torch's AdamW builds the denominator `sqrt(v)/bc + eps` (and the update) as new tensors. With the foreach
    implementation, torch's default on CUDA, that is one parameter-sized temporary for all parameters at once; on
    CPU torch uses the per-tensor loop, so two temporaries of the largest trainable tensor. bitsandbytes updates
    block by block in place."""
    if setup.optim.lower() not in ("adamw_torch", "adamw_torch_fused", "adamw", "paged_adamw_32bit"):
        return 0
    if setup.device == "cuda":
        return trainable * param_bytes
    if setup.full:
        largest = max([shape.vocab * shape.hidden] + [g.in_features * g.out_features for g in shape.layer_linears])
    else:
        largest = max([(g.in_features + g.out_features) * (setup.lora_r or 0)
                       for g in lora_groups(shape, setup.lora_targets)]
                      + [saved_module_params(shape, replace(setup, modules_to_save=(e,))) // max(shape.layers, 1)
                         for e in setup.modules_to_save])
    return 2 * largest * param_bytes


def sharded(value: int, setup: TrainSetup, min_stage: int) -> int:
    """ZeRO stage >= min_stage splits this across processes (2: gradients and optimizer states, 3: weights too)."""
    return math.ceil(value / setup.num_processes) if setup.zero >= min_stage and setup.num_processes > 1 else value


def layer_activation_bytes(shape: ModelShape, setup: TrainSetup, sequences: int | None = None) -> int:
    """Bytes autograd saves for one decoder layer's backward, for a Llama-style block (RMSNorm, attention with
    RoPE, gated MLP). `a` is the activation dtype, `r` the residual stream's:
    - 2 RMSNorms: input and normalized output in fp32 (8h), plus a compute-dtype copy when `r` is 16-bit (10h);
    - autocast (or bitsandbytes) casts each fp32 linear input separately (q, k, v, gate, up: a*h each) and saves
      the casts;
    - q and k: projection, rotate_half and rotated result (3a each); v (a); attention output and its contiguous
      copy for o_proj (2a*hq); MLP: gate, act(gate), up and their product (4a*i);
    - eager attention: the fp32 softmax (4) and its compute-dtype copy (a) per head per position pair, plus k and
      v repeated to every query head; sdpa/flash keep only a per-row logsumexp;
    - LoRA on a linear: its dropout mask (1 byte/input) and lora_A's compute-dtype input.
    """
    if setup.device == "cuda" and setup.residual_bytes == 2:
        return cuda_layer_activation_bytes(shape, setup, sequences)
    a, r = setup.compute_bytes, setup.residual_bytes
    h, i = shape.hidden, shape.intermediate
    hq, hk = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    seq, n = setup.max_length, (sequences or setup.sequences)
    per_token = 2 * (8 * h if r == 4 else 10 * h)
    # autocast (or bitsandbytes' own cast to its compute dtype) makes a new compute-dtype copy of each fp32 input
    casts_from_fp32 = (setup.autocast or setup.quantize is not None) and r == 4
    if casts_from_fp32:
        norm_fed = [g for g in shape.layer_linears if g.in_features == h and not _is_output_projection(g.name)]
        per_token += sum(a * g.in_features for g in norm_fed)
    # a mixture runs `experts_per_token` expert MLPs per token
    per_token += 3 * a * hq + 3 * a * hk + a * hk + 2 * a * hq + 4 * a * i * shape.experts_per_token + 4 * shape.heads
    if not setup.full:
        for group in lora_groups(shape, setup.lora_targets):
            dropout = setup.active_lora_dropout > 0
            mask = group.in_features if dropout else 0
            # without dropout lora_A reads the base layer's input: a new tensor only where autocast casts an fp32
            # input (q, k, v, gate, up), not where the input is already bf16 (o, down)
            new_input = dropout or (casts_from_fp32 and group.in_features == shape.hidden
                                    and not _is_output_projection(group.name))
            per_token += mask + (a * group.in_features if new_input else 0) + 2 * a * (setup.lora_r or 0)
    quadratic = 0
    if setup.attn == "eager":
        per_token += 2 * a * hq  # repeat_kv
        quadratic = n * shape.heads * seq * seq * (4 + a)
    return n * seq * per_token + quadratic


def cuda_layer_activation_bytes(shape: ModelShape, setup: TrainSetup, sequences: int | None = None) -> int:
    """What autograd saves per decoder layer on a GPU with 16-bit weights (bf16/fp16, no autocast casts of the
    weights), counted tensor by tensor for a Llama-style block and checked on the measured H100 peaks of issue 12:
    - frozen base linears save nothing (autograd keeps a matmul's input only for its weight's gradient; bitsandbytes'
      4-bit matmul keeps only the packed weight), so q/k/v, o, gate/up and down add no input copies;
    - 2 RMSNorms: the fp32 upcast of their input (4h each); the rsqrt is per token;
    - attention: rotated q and k, v, the output (a*(2hq + 2hk)), and SDPA's fp32 logsumexp per head (flash and
      memory-efficient kernels: no seq x seq term; eager adds the probabilities);
    - MLP: gate, up and act(gate) (3a*i); their product feeds only down_proj's LoRA;
    - LoRA per targeted linear: lora_A's input (a*in): a new tensor where PEFT casts the input to the fp32 adapter
      and autocast casts it back, or with dropout (plus its 1-byte mask); without either (QLoRA: TRL's bf16 adapter,
      DPO's disabled dropout) the input itself, shared by the linears that read it; lora_A's output (a*r) twice.
    """
    a = setup.compute_bytes
    h, i = shape.hidden, shape.intermediate
    hq, hk = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    seq, n = setup.max_length, (sequences or setup.sequences)
    per_token = 2 * 4 * h + a * (2 * hq + 2 * hk) + 4 * shape.heads + 3 * a * i * shape.experts_per_token
    if not setup.full:
        dropout = setup.active_lora_dropout > 0
        recast = trainable_bytes_per_param(setup) != a
        norms_read: set[str] = set()
        for group in lora_groups(shape, setup.lora_targets):
            if dropout or recast:
                per_token += (1 if dropout else 0) * group.in_features + a * group.in_features
            elif _is_output_projection(group.name):
                per_token += a * group.in_features  # attention output / MLP product: saved by nothing else
            elif (block := group.name.split(".")[0]) not in norms_read:  # one normed input per block (attn, mlp)
                norms_read.add(block)
                per_token += a * group.in_features
            per_token += 2 * a * (setup.lora_r or 0)
    quadratic = 0
    if setup.attn == "eager":
        per_token += 2 * a * hq  # repeat_kv
        quadratic = n * shape.heads * seq * seq * (4 + a)
    return n * seq * per_token + quadratic


def backward_working_set(shape: ModelShape, setup: TrainSetup) -> tuple[int, str]:
    """What the backward holds beside the saved tensors while it walks one layer. On CPU: about one layer's saved
    activations (measured). On a GPU: the MLP's intermediate gradients (gate, up, act: 3a*i) and the residual
    stream's gradient pair (2a*h) per token, which with the CUDA loss head matched the measured H100 peaks."""
    if setup.device == "cuda" and setup.residual_bytes == 2:
        a = setup.compute_bytes
        per_token = 3 * a * shape.intermediate + 2 * a * shape.hidden
        return setup.tokens * per_token, f"{setup.tokens:,} tokens x {per_token:,} B (MLP and residual gradients)"
    return layer_activation_bytes(shape, setup), "one layer's activation gradients, about the size of what it saved"


def _is_output_projection(name: str) -> bool:
    return bool(re.search(r"(o_proj|out_proj|dense|c_proj|down_proj|wo)$", name))


def autocast_weight_copy_bytes(shape: ModelShape, setup: TrainSetup, layers: int) -> int:
    """bf16 autocast over fp32 weights casts every layer linear's weight per forward and autograd saves the cast
    for the backward (2 bytes per weight); quantized layers dequantize to the compute dtype instead, one layer at
    a time."""
    if setup.quantize:
        largest = max((g.in_features * g.out_features for g in shape.layer_linears), default=0)
        return 2 * largest
    if not (setup.autocast and setup.residual_bytes == 4):
        return 0
    per_layer = shape.layer_linear_params // max(shape.layers, 1)
    return 2 * per_layer * layers


def head_bytes(shape: ModelShape, setup: TrainSetup, tokens: int) -> tuple[int, str]:
    """The loss head. Chunked (TRL's fused head): one tile of at most 4096 tokens x 32768 vocab in the compute
    dtype, its fp32 temporaries on CPU, the fp32 gradient of the hidden states, and per-token statistics.
    Unchunked: the full logits (b*s*V) in the compute dtype plus an fp32 upcast and fp32 log-softmax."""
    a, h, vocab = setup.compute_bytes, shape.hidden, shape.vocab
    if not setup.chunked_loss:
        return tokens * vocab * (a + 8), f"{tokens:,} tokens x {vocab:,} vocab x ({a}+4+4) B"
    tile = min(tokens, HEAD_TOKEN_CHUNK) * min(vocab, HEAD_VOCAB_CHUNK)
    temporaries = HEAD_FP32_TEMPORARIES_CPU if setup.device == "cpu" else 0
    # CPU: the torch fallback casts each vocabulary slice of the head's weight to fp32 for `_addmm_fp32`; the CUDA
    # Triton kernel reads the weight as it is.
    vocab_slice = min(vocab, HEAD_VOCAB_CHUNK) * h * (a + 4) if setup.device == "cpu" else 0
    total = tile * (a + 4 * temporaries) + tokens * (4 * h + 32) + vocab_slice
    return total, f"tile {min(tokens, HEAD_TOKEN_CHUNK)}x{min(vocab, HEAD_VOCAB_CHUNK)} x ({a}+{4 * temporaries}) B"


def activation_term(shape: ModelShape, setup: TrainSetup) -> tuple[int, str]:
    """All layers' saved activations, or with checkpointing each layer's input (r*h per token) plus one layer's
    working set, recomputed in the backward."""
    per_layer = layer_activation_bytes(shape, setup)
    if not setup.gradient_checkpointing:
        return shape.layers * per_layer, f"{shape.layers} layers x {per_layer / MiB:.1f} MiB"
    inputs = shape.layers * setup.tokens * setup.residual_bytes * shape.hidden
    return inputs + per_layer, f"{shape.layers} layer inputs ({inputs / MiB:.1f} MiB) + one layer {per_layer / MiB:.1f} MiB"


# ---- sampling (grpo) ---------------------------------------------------------------------------------------------

# RewardModel scores this many completions per forward (align/train/reward_model.py).
REWARD_MODEL_BATCH = 16


def sampling_bytes(setup: TrainSetup) -> int:
    """Bytes of the activations and cache while sampling: TRL calls generate outside the trainer's autocast, so they
    take the weights' dtype (measured: fp32 keys under bf16 autocast on CPU); bitsandbytes returns its input's."""
    return DTYPE_BYTES[setup.weights_dtype]


def kv_cache_bytes(shape: ModelShape, setup: TrainSetup) -> tuple[int, str]:
    """transformers' DynamicCache at the last sampled token: K and V per layer for every position (the left-padded
    prompt and the completion) of every completion of the generation batch."""
    b = sampling_bytes(setup)
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim * b
    total = setup.generation_batch * setup.max_length * per_token
    return total, (f"{setup.generation_batch} completions x {setup.max_length} positions x {shape.layers} layers x "
                   f"2 x {shape.kv_heads} kv heads x {shape.head_dim} x {b} B")


def no_grad_layer_bytes(shape: ModelShape, tokens: int, element: int) -> int:
    """A no-grad forward frees each layer's tensors as it leaves it, so it holds one layer's at a time: at most the
    MLP's up, act(gate) and their product (3i) beside the residual stream, its normed copy and the output (3h)."""
    return tokens * (3 * shape.intermediate * shape.experts_per_token + 3 * shape.hidden) * element


def sampling_working_set(shape: ModelShape, setup: TrainSetup) -> tuple[int, str]:
    """Beside the cache, the larger of the prefill (one layer over every prompt token, its keys and values repeated
    to every query head) and the last decoding step (one layer's K and V twice more: DynamicCache grows by
    torch.cat, so old and new copies coexist, and sdpa with a padding mask takes repeat_kv's copy per query head),
    plus the last position's logits (generate keeps logits_to_keep=1) and the sampler's fp32 copy, scores and
    probabilities."""
    b, g = sampling_bytes(setup), setup.generation_batch
    hq, hk = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    prompt_tokens = g * setup.prompt_length
    prefill = no_grad_layer_bytes(shape, prompt_tokens, b) + 2 * prompt_tokens * hq * b
    decode = 2 * g * setup.max_length * (hk + hq) * b
    logits = g * shape.vocab * (b + 3 * 4)
    which = "prefill layer" if prefill > decode else "one layer's K/V copy and repeat"
    return max(prefill, decode) + logits, f"{which} ({human(max(prefill, decode))}) + {g} x {shape.vocab} logits"


def reward_model_terms(setup: TrainSetup) -> list[Term]:
    """Each reward model (RewardModel loads it in fp32, on first use, and keeps it) and the largest one's scoring
    forward: no-grad, fp32, REWARD_MODEL_BATCH completions of prompt plus completion at a time. The rewards run after
    generate returns, so its cache is gone by then."""
    if not setup.reward_models:
        return []
    terms = [Term("reward model weights", 4 * rm.params, "persistent",
                  f"{rm.name}: {rm.params:,} params x 4 B (fp32 sequence classifier + adapter)")
             for rm in setup.reward_models]
    rows = min(REWARD_MODEL_BATCH, setup.generation_batch)
    largest = max(setup.reward_models, key=lambda rm: no_grad_layer_bytes(rm.shape, 1, 4))
    working = no_grad_layer_bytes(largest.shape, rows * setup.max_length, 4)
    terms.append(Term("reward model forward", working, "scoring",
                      f"{rows} x {setup.max_length} tokens through one layer at a time, fp32"))
    return terms


def sampling_terms(shape: ModelShape, setup: TrainSetup) -> list[Term]:
    if not setup.method.samples:
        return []
    kv, kv_how = kv_cache_bytes(shape, setup)
    working, working_how = sampling_working_set(shape, setup)
    return [Term("KV cache", kv, "sampling", kv_how),
            Term("sampling working set", working, "sampling", working_how),
            *reward_model_terms(setup)]


def reward_model_shape(model_dir: str) -> RewardModelShape:
    """The shape of an `align rm` output dir: its base's config and its adapter's config, no weights read."""
    from align.train.reward_model import check_reward_model_dir

    path = check_reward_model_dir(model_dir)
    shape = load_shape(str(path))
    config = json.loads((path / "adapter_config.json").read_text())
    listed = config.get("target_modules") or ()
    targets = listed if isinstance(listed, str) else tuple(listed)
    score_copy = shape.hidden  # PEFT trains a copy of the one-output score head (modules_to_save)
    return RewardModelShape(str(model_dir), shape, lora_params(shape, int(config.get("r") or 0), targets) + score_copy)


def reward_model_shapes(rewards: list[str] | tuple[str, ...]) -> tuple[RewardModelShape, ...]:
    """The reward models among `--reward` specs (`rm:DIR`); the other rewards are functions of text."""
    return tuple(reward_model_shape(r.removeprefix("rm:")) for r in rewards if r.startswith("rm:"))


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    setup: TrainSetup
    shape: ModelShape
    terms: list[Term]
    trainable_params: int
    budget: int | None = None
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""
    """Why the micro-batch and checkpointing differ from the recipe's (`gradient_checkpointing: auto`), if they do."""

    def phase_total(self, phase: Phase) -> int:
        persistent = sum(t.bytes for t in self.terms if t.phase == "persistent")
        if phase == "load":
            return sum(t.bytes for t in self.terms if t.phase == "load")
        return persistent + sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def moments(self) -> tuple[Phase, ...]:
        """The moments this run has: sampling and scoring only where a phase term belongs to them."""
        return tuple(m for m in MOMENTS if m not in ("sampling", "scoring") or any(t.phase == m for t in self.terms))

    @property
    def peak_phase(self) -> Phase:
        # ties go to the training moments, listed first
        order: tuple[Phase, ...] = ("forward_backward", "optimizer_step", "load", "sampling", "scoring")
        return max((m for m in order if m in self.moments), key=self.phase_total)

    @property
    def peak_bytes(self) -> int:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak_bytes <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "setup": {**asdict(self.setup), "reward_models": [rm.name for rm in self.setup.reward_models]},
            "shape": {k: v for k, v in asdict(self.shape).items() if k not in ("layer_linears", "module_params")},
            "trainable_params": self.trainable_params,
            "terms": [asdict(t) for t in self.terms],
            "phases": {p: self.phase_total(p) for p in self.moments},
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget,
            "fits": self.fits,
            "suggestions": self.suggestions,
        }


def plan_memory(shape: ModelShape, setup: TrainSetup, model: str = "", budget: int | None = None) -> Plan:
    """Every term of the peak for one process, grouped by the moment of the step that holds it."""
    check_setup(setup)
    trainable = trainable_params(shape, setup)
    tb = trainable_bytes_per_param(setup)
    weights, weights_how = weight_bytes(shape, setup)
    weights = sharded(weights, setup, 3)
    terms = [Term("weights", weights, "persistent", weights_how)]
    if not setup.full:
        saved = saved_module_params(shape, setup)
        terms.append(Term("adapter", trainable * tb, "persistent",
                          f"{trainable - saved:,} LoRA params" + (f" + {saved:,} in modules_to_save" if saved else "")
                          + f" x {tb} B"))
    opt_per = optimizer_bytes_per_param(setup.optim, tb) or 0.0
    terms.append(Term("optimizer states", sharded(math.ceil(trainable * opt_per), setup, 2), "persistent",
                      f"{trainable:,} x {opt_per:g} B ({setup.optim})"))
    mapped = 0
    if setup.quantize and setup.device == "cpu":
        # The unquantized tensors (embeddings, norms) are zero-copy views of the memory-mapped checkpoint, so the
        # mapping outlives the load, with every page the quantizer read still resident. Clean file pages: the
        # kernel can reclaim them under pressure, but RSS (and this plan) counts them.
        mapped = shape.total_params * DTYPE_BYTES[shape.stored_dtype]
        terms.append(Term("mapped checkpoint pages", mapped, "persistent",
                          f"{shape.total_params:,} x {DTYPE_BYTES[shape.stored_dtype]} B ({shape.stored_dtype} file),"
                          " reclaimable"))
    if setup.method.reference and setup.ref == "model":
        terms.append(Term("reference model", weights, "persistent", "a frozen copy of the weights"))
    overhead = CPU_FRAMEWORK_OVERHEAD if setup.device == "cpu" else 0
    terms.append(Term("framework overhead", overhead, "persistent",
                      "trainer, dataset, allocator arenas (measured)" if setup.device == "cpu"
                      else "none in max_memory_allocated (the CUDA context is taken off the device's memory)"))

    activations, act_how = activation_term(shape, setup)
    copy_layers = 1 if setup.gradient_checkpointing and not setup.full else shape.layers
    copies = autocast_weight_copy_bytes(shape, setup, copy_layers)
    head, head_how = head_bytes(shape, setup, setup.tokens)
    working, working_how = backward_working_set(shape, setup)
    grads = sharded(trainable * tb, setup, 2)
    # The backward frees each layer's saved tensors as it produces that layer's gradients, so gradients only add
    # to the peak beyond what has been freed: peak = saved + head + max(0, gradients - saved - head).
    # Full fine-tuning also produces the output head's weight gradient first, while every activation is still saved.
    head_grad = shape.vocab * shape.hidden * tb if setup.full else 0
    grads_beyond = max(head_grad, grads - activations - copies - head)
    terms += [
        Term("activations", activations, "forward_backward", act_how),
        Term("compute-dtype weight copies", copies, "forward_backward",
             "bf16 casts of layer weights saved for the backward" if copies else "none"),
        Term("loss head", head, "forward_backward", head_how),
        Term("backward working set", working, "forward_backward", working_how),
        Term("gradients", grads_beyond, "forward_backward",
             f"{trainable:,} x {tb} B = {human(grads)}, less the activations freed while they appear"),
        Term("step gradients", grads, "optimizer_step", "every gradient, held through the update"),
        Term("optimizer temporaries", optimizer_step_temporaries(setup, shape, trainable, tb), "optimizer_step",
             "AdamW's denominator: all parameters at once (foreach, CUDA) or the largest tensor twice (CPU)"),
    ]
    terms += sampling_terms(shape, setup)
    terms.append(Term("loading", weights + mapped + overhead, "load",
                      "safetensors are mapped, not copied, when the dtype matches"))
    return Plan(model, setup, shape, terms, trainable, budget)


# ---- suggestions -------------------------------------------------------------------------------------------------


def candidate_changes(setup: TrainSetup) -> list[tuple[str, TrainSetup]]:
    """Changes in the order of what they cost (speed or quality), each a single step from `setup`."""
    changes: list[tuple[str, TrainSetup]] = []
    if setup.attn == "eager":
        better = "flash" if setup.device == "cuda" else "sdpa"
        changes.append((f"--attn {better}", replace(setup, attn=better)))
    if not setup.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", replace(setup, gradient_checkpointing=True)))
    if setup.batch_size > 1:
        smaller = max(1, setup.batch_size // 2)
        accum = setup.grad_accum * setup.batch_size // smaller
        changes.append((f"--batch-size {smaller} --grad-accum {accum}",
                        replace(setup, batch_size=smaller, grad_accum=accum)))
    if setup.optim in ("adamw_torch", "adamw_torch_fused", "adamw", "paged_adamw_32bit"):
        changes.append(("--optim adamw_8bit", replace(setup, optim="adamw_8bit")))
    if setup.full:
        changes.append(("--lora-r 16 (LoRA instead of --full)", replace(setup, lora_r=16)))
    elif setup.quantize is None:
        changes.append(("--quantize 4bit (QLoRA)", replace(setup, quantize="4bit")))
    return changes


def suggest(shape: ModelShape, setup: TrainSetup, budget: int, model: str = "") -> list[dict[str, Any]]:
    """Single changes that fit, cheapest first; if none does, the cumulative combination in that order."""
    single = []
    for change, changed in candidate_changes(setup):
        peak = plan_memory(shape, changed, model).peak_bytes
        single.append({"change": change, "peak_bytes": peak, "fits": peak <= budget})
    fitting = [s for s in single if s["fits"]]
    if fitting:
        return fitting
    # Each change removes itself from the next round's candidates (the batch halves down to 1), so this ends.
    current, applied = setup, []
    while options := candidate_changes(current):
        change, current = options[0]
        applied.append(change)
        peak = plan_memory(shape, current, model).peak_bytes
        if peak <= budget:
            return [{"change": " ".join(applied), "peak_bytes": peak, "fits": True}]
    peak = plan_memory(shape, current, model).peak_bytes
    return [{"change": " ".join(applied) or "nothing left to change", "peak_bytes": peak, "fits": False}]


def plan_with_budget(shape: ModelShape, setup: TrainSetup, model: str = "", budget: int | None = None) -> Plan:
    plan = plan_memory(shape, setup, model, budget)
    if budget is not None and not plan.fits:
        plan.suggestions = suggest(shape, setup, budget, model)
    return plan


# ---- from a recipe -----------------------------------------------------------------------------------------------


def setup_from_recipe(recipe: Any, stage: Stage, ref: str | None = None, device: str | None = None,
                      full: bool = False) -> TrainSetup:
    """The setup `align sft` / `align dpo` would run with: precision resolved as the run resolves it.
    `gradient_checkpointing: auto` is planned off here; `plan_from_recipe` turns it on when that does not fit."""
    from align.core.models import pick_precision

    device = device or _default_device()
    precision = pick_precision(recipe.model.dtype, device)
    train = recipe.train_arguments()  # with the recipe's defaults, so the plan is of the run the command would do
    targets = recipe.lora.target_modules
    from align.train.methods import METHODS

    sampling = sampling_settings(train, getattr(recipe, "rewards", ())) if METHODS[stage].samples else {}
    return TrainSetup(
        stage=stage,
        device=device,  # type: ignore[arg-type]
        weights_dtype=str(precision.weights).removeprefix("torch."),
        autocast=precision.bf16_autocast,
        quantize=recipe.model.quantize,
        lora_r=None if full else recipe.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(recipe.lora.modules_to_save or ()),
        lora_dropout=recipe.lora.dropout,
        optim=str(train["optim"]),
        batch_size=int(train["per_device_train_batch_size"]),
        # None (no truncation): a typical length; grpo has none (a prompt plus max_completion_length)
        max_length=int(train.get("max_length") or sampling.get("max_length") or TrainSetup.max_length),
        grad_accum=int(train["gradient_accumulation_steps"]),
        gradient_checkpointing=recipe.model.gradient_checkpointing is True or bool(train.get("gradient_checkpointing")),
        attn="flash" if str(recipe.model.attn).startswith("flash") else recipe.model.attn,
        ref=(ref or ("precompute" if train.get("precompute_ref_log_probs") else "adapter")),  # type: ignore[arg-type]
        **{k: v for k, v in sampling.items() if k != "max_length"},
    )


# A prompt's tokens where the recipe sets no length (GRPO keeps prompts whole): TRL's max_prompt_length default
# before 1.0 dropped it.
TYPICAL_PROMPT_TOKENS = 512


def sampling_settings(train: dict[str, Any], rewards: Any) -> dict[str, Any]:
    """A sampling method's settings from its TRL config fields: the completion length, the micro-batches a
    generation batch feeds, the reward models."""
    completion = int(train.get("max_completion_length") or TrainSetup.max_completion_length)
    steps = train.get("steps_per_generation")
    if steps is None and train.get("generation_batch_size"):
        steps = int(train["generation_batch_size"]) // int(train["per_device_train_batch_size"])
    return {"max_length": TYPICAL_PROMPT_TOKENS + completion, "max_completion_length": completion,
            "steps_per_generation": int(steps) if steps else None, "reward_models": reward_model_shapes(rewards or ())}


def plan_from_recipe(recipe: Any, stage: Stage, ref: str | None = None, budget: int | None = None,
                     full: bool = False, device: str | None = None) -> Plan:
    """The plan for the exact run `align sft/dpo` would do (for `--dry-run`). With `gradient_checkpointing: auto`
    the run checkpoints only when the plan without it exceeds `budget` (default: this device's memory)."""
    shape = load_shape(recipe.model.name)
    setup = setup_from_recipe(recipe, stage, ref, device, full)
    plan = plan_with_budget(shape, setup, recipe.model.name, budget)
    if recipe.model.gradient_checkpointing == "auto" and not setup.gradient_checkpointing:
        limit = budget if budget is not None else available_memory(setup.device)
        if plan.peak_bytes > limit:
            chosen, reason = choose_layout(shape, setup, limit, recipe.model.name)
            plan = plan_with_budget(shape, chosen, recipe.model.name, budget)
            plan.layout = reason
    return plan


# ---- a run that does not fit: micro-batch before recompute -------------------------------------------------------

# The cost model that ranks the ways to fit, as predicted time per token relative to an ideal run:
#     (1 + MICRO_BATCH_FIXED_TOKENS / tokens per micro-batch) x (CHECKPOINTING_COST if checkpointing)
# - Checkpointing recomputes every layer's forward inside the backward; the forward is 2N of a step's 6N FLOPs per
#   token, so +33%.
# - Each micro-batch pays a fixed cost (kernel launches and Python work per module, which do not grow with the
#   tokens), which larger micro-batches amortize; the constant is that cost in tokens' worth of compute. CUDA: 2048,
#   fitted to issue 14's H100 runs of a 1.07B Llama (4096 tokens per micro-batch 15.8k tok/s, 8192 tokens 18.8k:
#   ratio 1.19). CPU: 64, not measured; CPU matmuls saturate at far smaller sizes, and any small constant keeps the
#   order that matters (the largest micro-batch that fits first).
# Gradient accumulation keeps the effective batch (micro-batch x accumulation) the recipe asked for, so the
# optimisation step is the same; only the arithmetic is split.
CHECKPOINTING_COST = 4 / 3
MICRO_BATCH_FIXED_TOKENS = {"cuda": 2048, "cpu": 64}


def predicted_relative_time(setup: TrainSetup) -> float:
    """Time per token relative to an ideal run, by the cost model above."""
    fixed = MICRO_BATCH_FIXED_TOKENS[setup.device]
    return (1 + fixed / setup.tokens) * (CHECKPOINTING_COST if setup.gradient_checkpointing else 1.0)


def layout_options(setup: TrainSetup) -> list[TrainSetup]:
    """Every micro-batch that divides the batch (same effective batch through accumulation), with and without
    checkpointing."""
    effective = setup.batch_size * setup.grad_accum
    return [replace(setup, batch_size=micro, grad_accum=effective // micro, gradient_checkpointing=checkpointing)
            for micro in range(setup.batch_size, 0, -1) if setup.batch_size % micro == 0
            for checkpointing in (False, True)]


def choose_layout(shape: ModelShape, setup: TrainSetup, limit: int, model: str = "") -> tuple[TrainSetup, str]:
    """The fastest predicted micro-batch / checkpointing combination whose planned peak fits `limit`; when none
    does, the one with the smallest peak (the run may still fit, the plan is conservative). The reason names the
    choice, its peak and the alternatives' predicted cost."""
    options = [(predicted_relative_time(o), plan_memory(shape, o, model).peak_bytes, o) for o in layout_options(setup)]
    fitting = [o for o in options if o[1] <= limit]
    asked = f"batch {setup.batch_size} x accumulation {setup.grad_accum} does not fit ({human(options[0][1])} " \
            f"planned against {human(limit)} of {setup.device} memory)"
    if not fitting:
        cost, peak, chosen = min(options, key=lambda o: o[1])
        return chosen, f"{asked}; nothing fits, so the smallest plan: {_layout_name(chosen)} ({human(peak)})"
    cost, peak, chosen = min(fitting, key=lambda o: (o[0], o[1]))
    runner_up = [o for o in fitting if o[2] != chosen]
    others = ", ".join(f"{_layout_name(o[2])} {o[0] / cost:.2f}x" for o in sorted(runner_up, key=lambda o: o[0])[:2])
    return chosen, (f"{asked}; chose {_layout_name(chosen)} ({human(peak)}), the fastest predicted that fits"
                    + (f" (predicted time vs it: {others})" if others else ""))


def _layout_name(setup: TrainSetup) -> str:
    return (f"micro-batch {setup.batch_size} x accumulation {setup.grad_accum}"
            + (" with checkpointing" if setup.gradient_checkpointing else " without checkpointing"))


# ---- packing: when it pays ---------------------------------------------------------------------------------------


def packing_speedup(shape: ModelShape, lengths: list[int], batch: int, max_length: int, dense_mask: bool,
                    seed: int = 0) -> float:
    """Predicted time per real token unpacked / packed (> 1: packing is faster), by FLOPs.

    Unpacked, each batch of `batch` rows (in a seeded random order, as the Trainer samples) is padded to its longest
    row, and every padded token costs the linears (6N FLOPs) and causal attention over its row. Packed (TRL's bfd
    into rows of `max_length`, padding-free), there is no padding; the attention either stays inside each sequence
    (a varlen kernel: sum of L^2) or, with `dense_mask` (sdpa/eager with the block-diagonal mask transformers builds
    from position ids), runs over the whole flattened batch of `batch` rows, the mask hiding but not skipping the
    other sequences' pairs. Attention per query-key pair: 4 FLOPs per query channel per layer, x3 for the backward.
    """
    import random

    lengths = [min(n, max_length) for n in lengths if n > 0]
    if not lengths:
        return 1.0
    linear = 6 * shape.total_params
    pair = 12 * shape.heads * shape.head_dim * shape.layers
    order = lengths[:]
    random.Random(seed).shuffle(order)
    unpacked = 0.0
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        padded = max(rows)
        unpacked += len(rows) * (padded * linear + padded * padded / 2 * pair)
    total = sum(lengths)
    if dense_mask:
        flattened = min(total, batch * max_length)  # the tokens of one step, as one row
        packed = total * linear + total * flattened * pair
    else:
        packed = total * linear + sum(n * n / 2 for n in lengths) * pair
    return unpacked / packed


def available_memory(device: str) -> int:
    """Total memory of the device a run would use: the GPU's, or the machine's RAM. A process capped with
    `torch.cuda.set_per_process_memory_fraction` (a GPU shared with other jobs) plans within its cap: the caching
    allocator refuses to reserve beyond total x fraction, and the CUDA context lies outside that count."""
    import os

    if device == "cuda":
        import torch

        total = int(torch.cuda.get_device_properties(0).total_memory)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(0)
        return min(total - CUDA_CONTEXT, int(total * fraction))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- presentation ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """`24GiB`, `24GB`, `512MiB`, `1.5G`, or a plain number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise AlignError(f"--budget {text!r}: expected a size such as 24GiB, 16GB or 512MiB")
    number, prefix, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).lower()
    base = 1000 if suffix == "b" and prefix else 1024
    return int(number * base ** "KMGT".find(prefix) * base) if prefix else int(number)


def human(n: int | float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.1f} KiB"


def format_plan(plan: Plan) -> str:
    s, shape = plan.setup, plan.shape
    method = "full fine-tuning" if s.full else (f"LoRA r={s.lora_r}" if s.lora_targets else "no LoRA") + (
        f", whole {','.join(s.modules_to_save)}" if s.modules_to_save else "") + (
        f" on a {s.quantize} base" if s.quantize else "")
    precision = f"{s.weights_dtype} weights" + (" + bf16 autocast" if s.autocast else "")
    lines = [
        f"plan: {plan.model or shape.model_type} ({shape.total_params / 1e6:,.1f}M params, {shape.layers} layers)"
        f" · {s.stage} · {method} · {precision} on {s.device}",
        f"      batch {s.batch_size} x {s.max_length} tokens"
        + (f" x{s.method.sequences_per_row} (sequences per row)" if s.method.sequences_per_row > 1 else "")
        + f", accumulation {s.grad_accum}, attn {s.attn}, optim {s.optim}"
        + (", checkpointing" if s.gradient_checkpointing else "")
        + (f", ZeRO-{s.zero} over {s.num_processes}" if s.zero and s.num_processes > 1 else ""),
        *([f"      sampling {s.generation_batch} completions at once (batch x steps per generation), "
           f"{s.max_completion_length} of the {s.max_length} tokens sampled"] if s.method.samples else []),
        f"      trainable {plan.trainable_params:,} ({plan.trainable_params / max(shape.total_params, 1):.2%})",
        "",
        f"  {'term':<30}{'phase':<18}{'memory':>12}  how",
    ]
    for term in plan.terms:
        if term.bytes:
            lines.append(f"  {term.name:<30}{term.phase:<18}{human(term.bytes):>12}  {term.formula}")
    lines.append("")
    for phase in plan.moments:
        mark = "  <- peak" if phase == plan.peak_phase else ""
        lines.append(f"  {'total at ' + phase:<48}{human(plan.phase_total(phase)):>12}{mark}")  # type: ignore[arg-type]
    if plan.budget is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  budget {human(plan.budget)}: {verdict}")
        for suggestion in plan.suggestions:
            tag = "fits" if suggestion["fits"] else "still too big"
            lines.append(f"    try {suggestion['change']}: peak {human(suggestion['peak_bytes'])} ({tag})")
    if plan.layout:
        lines.append(f"  gradient_checkpointing auto: {plan.layout}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
