"""The command line of every stage: MiniMind2's flag names and defaults, then ours, and the checks that need
nothing but the flags (run before any model or data is built). A bad value is a ConfigError naming the flag."""
import argparse
import os
from pathlib import Path

import torch

from kernels import get_backend
from minimind.config import AUX_LOSS_SCOPES, PRESETS, MiniMindConfig
from train import distributed


class ConfigError(ValueError):
    """A bad flag, a missing file, or a checkpoint that does not fit the configuration: raised before training."""


CHAT_KINDS = ("sft", "reason")  # data kinds with MiniMind's SFT augmentations (minimind.data.augment)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

GPU_RECIPE = """\
GPU recipe (MiniMind2-Small on MiniMind's data, from the repository root):
  python -m train.pretrain --preset small --data_path dataset/pretrain_hq.jsonl
  python -m train.sft      --preset small --data_path dataset/sft_mini_512.jsonl
  python -m train.dpo      --preset small --data_path dataset/dpo.jsonl
  python -m train.reason   --preset small --data_path dataset/r1_mix_1024.jsonl
Several GPUs: torchrun --nproc_per_node N -m train.pretrain ...  (or add --deepspeed train/configs/ds_zero2.json)
"""


def _flag_bool(s):
    if str(s).lower() in ("1", "true", "yes"):
        return True
    if str(s).lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1, got {s!r}")


def build_parser(stage) -> argparse.ArgumentParser:
    """MiniMind2's flag names and defaults, then ours; stage.defaults override the generic defaults."""
    p = argparse.ArgumentParser(prog=f"python -m train.{stage.name}", description=f"MiniMind {stage.name} stage",
                                epilog=GPU_RECIPE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("MiniMind2 flags")
    g.add_argument("--epochs", type=int, default=1, help="passes over the data (default %(default)s)")
    g.add_argument("--batch_size", type=int, default=32, help="micro-batch size per process (default %(default)s)")
    g.add_argument("--learning_rate", type=float, default=5e-4,
                   help="LR of MiniMind2's cosine schedule, lr/10 + lr/2 * (1 + cos(pi * step / steps)): it starts at "
                        "1.1x this value and ends at a tenth of it (default %(default)s)")
    g.add_argument("--accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step, their gradients averaged (default %(default)s)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps")
    g.add_argument("--log_interval", type=int, default=100,
                   help="log loss, lr, tokens/s and MFU every N optimizer steps (default %(default)s)")
    g.add_argument("--save_interval", type=int, default=100, help="save weights + resume state every N steps")
    g.add_argument("--hidden_size", type=int, default=None, help="default 512 (or the --preset's)")
    g.add_argument("--num_hidden_layers", type=int, default=None, help="default 8 (or the --preset's)")
    g.add_argument("--max_seq_len", type=int, default=512,
                   help="tokens per row: longer records are truncated (default %(default)s)")
    g.add_argument("--use_moe", type=_flag_bool, default=None, help="0 or 1 (default 0, or the --preset's)")
    g.add_argument("--data_path", default=None, help="JSON Lines training data")
    g.add_argument("--from_weight", default="none",
                   help="starting weights: none | a stage prefix (pretrain -> OUT_DIR/pretrain_{hidden}.pth) | a path")
    g.add_argument("--save_weight", default=stage.save_prefix, help="prefix of the weight file this run writes")
    g.add_argument("--from_resume", default="0",
                   help="0 | 1 (continue from OUT_DIR's resume checkpoint if there is one) | a resume file path")
    g.add_argument("--use_wandb", action="store_true",
                   help="also log to wandb (offline unless WANDB_API_KEY is set; pip install -e '.[wandb]')")
    g.add_argument("--wandb_project", default=f"MiniMind-{stage.name}", help="wandb project (default %(default)s)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="autocast compute dtype (default bf16 on CUDA, fp32 on CPU); GradScaler only for fp16")
    g.add_argument("--device", default=None, help="default cuda (cuda:LOCAL_RANK under torchrun) or cpu")
    g.add_argument("--out_dir", default="out",
                   help="where weights, their .json cards, resume state and the metrics log go (default %(default)s)")
    o = p.add_argument_group("ours")
    o.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="MiniMind2: small | base | moe; minimind-3: minimind3 | minimind3-moe "
                        "(python -m minimind.model lists them)")
    o.add_argument("--num_attention_heads", type=int, default=None, help="query heads (default 8, or the --preset's)")
    o.add_argument("--num_key_value_heads", type=int, default=None,
                   help="key/value heads of grouped-query attention (default 2, or the --preset's)")
    o.add_argument("--head_dim", type=int, default=None, help="default hidden_size / num_attention_heads")
    o.add_argument("--qk_norm", type=_flag_bool, default=None, help="0 or 1: RMSNorm of q and k before RoPE "
                   "(minimind-3; default the --preset's, else 0)")
    o.add_argument("--intermediate_size", type=int, default=None, help="MLP (and expert) width; default the "
                   "preset's rule: MiniMind2 64*ceil(int(8*hidden/3)/64), minimind-3 64*ceil(hidden*pi/64)")
    o.add_argument("--rms_norm_eps", type=float, default=None, help="default 1e-5 (minimind-3: 1e-6)")
    o.add_argument("--n_routed_experts", type=int, default=None, help="MoE: routed experts (default 4)")
    o.add_argument("--n_shared_experts", type=int, default=None, help="MoE: shared experts (MiniMind2 1, minimind-3 0)")
    o.add_argument("--num_experts_per_tok", type=int, default=None, help="MoE top-k (MiniMind2 2, minimind-3 1)")
    o.add_argument("--aux_loss_alpha", type=float, default=None,
                   help="MoE load-balancing loss weight (MiniMind2 0.1, minimind-3 5e-4)")
    o.add_argument("--aux_loss_scope", default=None, choices=AUX_LOSS_SCOPES,
                   help="MoE aux loss per sequence (MiniMind2) or over the batch (minimind-3)")
    o.add_argument("--kernels", default=None, choices=("torch", "triton", "liger"),
                   help="op backend (default triton on CUDA, torch on CPU)")
    o.add_argument("--attn", default="sdpa", choices=("sdpa", "flash"),
                   help="attention: torch's scaled_dot_product_attention, or flash-attn when installed")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile every decoder block of the trained and the frozen models")
    o.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled blocks (implies --compile). reduce-overhead replays "
                        "each block's kernels as a CUDA graph instead of launching them one by one: for static "
                        "shapes (packed pretraining rows; every new batch length records another graph). "
                        "Untested on a GPU so far")
    o.add_argument("--deepspeed", default=None, metavar="CONFIG", help="DeepSpeed JSON (train/configs/ds_zero2.json)")
    o.add_argument("--seed", type=int, default=42, help="seeds the initial weights and the data order")
    o.add_argument("--init", default="normal", choices=("normal", "minimind2"),
                   help="weights of a model trained from scratch: normal(0, 0.02) (ours) | minimind2 (MiniMind2's "
                        "initial weights for --seed: PyTorch's default inits in MiniMind2's order; its trainer "
                        "seeds 1337)")
    o.add_argument("--shuffle", type=_flag_bool, default=True,
                   help="1: shuffle every epoch (chat kinds length-bucketed), drop the last partial batch; 0: "
                        "MiniMind2's order, the file in order with the last partial batch kept")
    o.add_argument("--skip_bad_records", action="store_true", help="skip malformed JSONL lines instead of failing")
    o.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled one)")
    o.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (default %(default)s)")
    o.add_argument("--max_steps", type=int, default=0, help="cap the optimizer steps (0 = all epochs)")
    o.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: looked up)")
    o.add_argument("--stop_after", type=int, default=0,
                   help="(testing) stop as on SIGINT after N optimizer steps of this run: save the resume state, "
                        "exit 130 (under torchrun: a failed worker, exit 1)")
    if stage.data_kind in CHAT_KINDS:
        o.add_argument("--add_system_ratio", type=float, default=None,
                       help="probability of giving a conversation without system message or tools one of MiniMind's "
                            "10 system prompts (default: 0.2 for a minimind-3 tokenizer, 0 for MiniMind2's)")
        o.add_argument("--drop_empty_think_ratio", type=float, default=None,
                       help="probability of removing a conversation's empty <think></think> blocks (default: 0.8 "
                            "for a minimind-3 tokenizer, 0 for MiniMind2's)")
    if stage.add_args:
        stage.add_args(p)
    p.set_defaults(**stage.defaults, recipe=None)  # recipe: not a flag, parse_flags' line on the recipe applied
    _document_minimind3_defaults(p, stage)
    return p


MINIMIND3_PRESETS = tuple(name for name in PRESETS if name.startswith("minimind3"))
DEFAULT_IN_HELP = "(default %(default)s)"


def _value(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def _document_minimind3_defaults(p, stage):
    """Each flag whose minimind-3 default differs says so in its help; --preset says what it does to the recipe."""
    actions = {a.dest: a for a in p._actions}
    recipe = stage.minimind3_defaults
    for name, value in (recipe or {}).items():
        if name not in actions:
            raise ValueError(f"stage {stage.name}: minimind3_defaults names {name!r}, not one of its flags")
        action = actions[name]
        if value != action.default:
            if DEFAULT_IN_HELP not in action.help:
                raise ValueError(f"stage {stage.name}: the help of --{name} lacks {DEFAULT_IN_HELP!r}")
            action.help = action.help.replace(
                DEFAULT_IN_HELP, f"(default %(default)s; {_value(value)} with --preset minimind3 / minimind3-moe)")
    changed = [f"--{k} {_value(v)}" for k, v in (recipe or {}).items() if v != actions[k].default]
    if recipe is None:
        note = f"; minimind-3 publishes no {stage.name} recipe: under its presets this stage keeps MiniMind2's defaults"
    elif changed:
        note = "; minimind3 / minimind3-moe also set minimind-3's recipe where a flag is not given: " + \
            ", ".join(changed)
    else:
        note = "; minimind3 / minimind3-moe keep this stage's recipe defaults (they are minimind-3's too)"
    actions["preset"].help += note


def given_flags(stage, argv=None) -> set:
    """The dests of the flags argv (default sys.argv[1:]) gives, in any form argparse takes (--flag value,
    --flag=value, a unique prefix): argv parsed again by the stage's parser with every default suppressed."""
    probe = build_parser(stage)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults.clear()
    return set(vars(probe.parse_args(argv)))


def parse_flags(stage, argv=None):
    """(parser, args): the stage's flags, and under --preset minimind3 / minimind3-moe minimind-3's recipe
    (stage.minimind3_defaults) for every flag argv does not give; a given flag wins, even at a default's value.
    args.recipe is the line saying which recipe was applied (None without a minimind-3 preset)."""
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if args.preset not in MINIMIND3_PRESETS:
        return parser, args
    if stage.minimind3_defaults is None:
        args.recipe = (f"recipe: MiniMind2's {stage.name} defaults under --preset {args.preset} (minimind-3 "
                       f"publishes no {stage.name} recipe)")
        return parser, args
    given = given_flags(stage, argv)
    applied = {k: v for k, v in stage.minimind3_defaults.items() if k not in given}
    kept = [f"--{k} {_value(getattr(args, k))}" for k in stage.minimind3_defaults if k in given]
    vars(args).update(applied)
    args.recipe = (f"recipe: minimind-3's {stage.name} defaults for --preset {args.preset} ("
                   + (", ".join(f"{k} {_value(v)}" for k, v in applied.items()) or "none left") + ")"
                   + (f"; given on the command line: {', '.join(kept)}" if kept else ""))
    return parser, args


MODEL_FLAGS = ("hidden_size", "num_hidden_layers", "use_moe", "num_attention_heads", "num_key_value_heads", "head_dim",
               "qk_norm", "intermediate_size", "rms_norm_eps", "n_routed_experts", "n_shared_experts",
               "num_experts_per_tok", "aux_loss_alpha", "aux_loss_scope")


def config_from_args(args, vocab_size: int) -> MiniMindConfig:
    """--preset first, then any explicit model flag on top of it."""
    base = dict(PRESETS[args.preset]) if args.preset else {}
    for name in MODEL_FLAGS:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    try:
        return MiniMindConfig(vocab_size=vocab_size, **base)
    except ValueError as e:
        raise ConfigError(f"bad model flags: {e}") from None


def check_args(args, stage):
    """Everything that can be checked from the flags alone, before any model or data is built."""
    if args.compile_mode:
        args.compile = True
    for name in ("epochs", "batch_size", "accumulation_steps", "max_seq_len", "log_interval", "save_interval"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise ConfigError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not args.data_path or not Path(args.data_path).is_file():
        raise ConfigError(f"--data_path {args.data_path}: no such file")
    if args.device is None or (args.device == "cuda" and distributed.launched_by_torchrun()):
        local = int(os.environ.get("LOCAL_RANK", 0))  # one GPU per process under torchrun
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ConfigError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.dtype is None:
        args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if DTYPES[args.dtype] == torch.float16 and device.type != "cuda":
        raise ConfigError(f"--dtype {args.dtype} needs a CUDA device (CPUs have no fast fp16 matmuls and fp16 "
                          "needs loss scaling); use --dtype bf16 or fp32 on the CPU")
    if args.kernels is None:
        args.kernels = "triton" if device.type == "cuda" else "torch"
    try:
        get_backend(args.kernels)
    except RuntimeError as e:
        raise ConfigError(f"--kernels {args.kernels}: {e}") from None
    if args.kernels == "liger" and device.type != "cuda":
        raise ConfigError(f"--kernels liger needs a CUDA device, not --device {args.device}")
    if args.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"--kernels triton on --device {args.device} runs only under Triton's interpreter "
                          "(TRITON_INTERPRET=1, slow: for tests); use --kernels torch on the CPU")
    if args.deepspeed:
        if not Path(args.deepspeed).is_file():
            raise ConfigError(f"--deepspeed {args.deepspeed}: no such file")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("--deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
        if args.compile:
            raise ConfigError("--compile with --deepspeed is not supported; drop one of them")
    if args.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--use_wandb needs wandb: pip install -e '.[wandb]'") from None
    for name in ("add_system_ratio", "drop_empty_think_ratio"):
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name} must be in [0, 1], got {value}")
    if args.from_resume not in ("0", "1") and not Path(args.from_resume).exists():
        raise ConfigError(f"--from_resume {args.from_resume}: no such file")
    if stage.check_args:
        stage.check_args(args)
    return device
