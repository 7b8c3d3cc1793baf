"""--preset minimind3 / minimind3-moe give every stage minimind-3's recipe defaults for the flags the command line
does not give; a given flag always wins; without those presets MiniMind2's recipe stays. The expected numbers are
written here from the specs (and checked against the specs' tables when ../shared is there), not read from the
stages, so a mistyped default fails."""
import re

import pytest
import torch

from minimind.config import MiniMindConfig
from minimind.lora import apply_lora
from minimind.model import MiniMindForCausalLM
from tests.reference_files import reference_folder
from tests.train_helpers import demo_data, one_thread, tiny_flags  # noqa: F401  (fixtures)
from train import distill, dpo, engine, flags, grpo, lora, ppo, pretrain, reason, sft

STAGES = {"pretrain": pretrain, "sft": sft, "lora": lora, "dpo": dpo, "distill": distill, "reason": reason,
          "grpo": grpo, "ppo": ppo}
ROW = ("epochs", "batch_size", "learning_rate", "accumulation_steps", "max_seq_len")

# minimind3-spec.md, "Training recipes (minimind-3 defaults)": epochs | batch | lr | accum | seq len, and what the
# row names beside them (LoRA rank 16 on the square linears; DPO beta 0.15; distillation alpha 0.5, T 1.5; GRPO and
# PPO 768 prompt + 1024 generated tokens, PPO's critic lr 5e-7). No reasoning row: MiniMind2's stays.
MINIMIND3 = {
    "pretrain": (2, 32, 5e-4, 8, 340, {}),
    "sft": (2, 16, 1e-5, 1, 768, {}),
    "lora": (10, 32, 1e-4, 1, 340, {"lora_rank": 16, "lora_targets": "square"}),
    "dpo": (1, 4, 4e-8, 1, 1024, {"beta": 0.15}),
    "distill": (6, 32, 5e-6, 1, 340, {"alpha": 0.5, "temperature": 1.5}),
    "grpo": (1, 2, 3e-7, 1, 768, {"max_gen_len": 1024}),
    "ppo": (1, 2, 3e-7, 1, 768, {"max_gen_len": 1024, "critic_learning_rate": 5e-7}),
}
# minimind2-spec.md, "Training recipes (MiniMind2 defaults)" (LoRA rank 8, DPO beta 0.1); GRPO and PPO have no
# MiniMind2 row: their defaults are MiniMind's RL trainers', minimind-3's
MINIMIND2 = {
    "pretrain": (1, 32, 5e-4, 8, 512, {}),
    "sft": (2, 16, 5e-7, 1, 512, {}),
    "lora": (10, 32, 1e-4, 1, 512, {"lora_rank": 8}),
    "dpo": (2, 4, 1e-8, 1, 1024, {"beta": 0.1}),
    "distill": (6, 32, 5e-6, 1, 512, {"alpha": 0.5, "temperature": 1.5}),
    "reason": (1, 8, 1e-6, 1, 1024, {}),
    "grpo": MINIMIND3["grpo"],
    "ppo": MINIMIND3["ppo"],
}
EXPECTED_UNDER_MINIMIND3 = {**MINIMIND3, "reason": MINIMIND2["reason"]}


def as_flags(row):
    *values, extra = row
    return {**dict(zip(ROW, values)), **extra}


def recipe_of(args, names):
    return {k: getattr(args, k) for k in names}


@pytest.mark.parametrize("preset", ["minimind3", "minimind3-moe"])
@pytest.mark.parametrize("name", STAGES)
def test_minimind3_presets_give_the_spec_recipe(name, preset):
    want = as_flags(EXPECTED_UNDER_MINIMIND3[name])
    _, args = flags.parse_flags(STAGES[name].STAGE, ["--preset", preset])
    assert recipe_of(args, want) == want
    assert (args.warmup_iters, args.grad_clip) == (0, 1.0)  # "grad clip 1.0 ... cosine from lr to lr/10, no warmup"
    assert args.recipe.startswith("recipe: ") and f"--preset {preset}" in args.recipe
    _, args = flags.parse_flags(STAGES[name].STAGE, [f"--preset={preset}"])
    assert recipe_of(args, want) == want


@pytest.mark.parametrize("argv", [[], ["--preset", "small"], ["--preset", "base"], ["--preset", "moe"]])
@pytest.mark.parametrize("name", STAGES)
def test_without_a_minimind3_preset_the_minimind2_recipe_stays(name, argv):
    want = as_flags(MINIMIND2[name])
    _, args = flags.parse_flags(STAGES[name].STAGE, argv)
    assert recipe_of(args, want) == want and args.recipe is None
    # build_parser alone (no preset applied) gives the same
    assert recipe_of(flags.build_parser(STAGES[name].STAGE).parse_args(argv), want) == want


@pytest.mark.parametrize("form", ["--learning_rate 1e-3", "--learning_rate=1e-3", "--learning 1e-3",
                                  "--learning=1e-3"])
@pytest.mark.parametrize("name", STAGES)
def test_a_given_flag_wins_over_the_minimind3_recipe(name, form):
    """--flag value, --flag=value and argparse's prefix abbreviation all count as given; the rest of the row is
    still minimind-3's."""
    want = {**as_flags(EXPECTED_UNDER_MINIMIND3[name]), "learning_rate": 1e-3}
    _, args = flags.parse_flags(STAGES[name].STAGE, ["--preset", "minimind3-moe", *form.split()])
    assert recipe_of(args, want) == want
    if STAGES[name].STAGE.minimind3_defaults is not None:
        assert "given on the command line: --learning_rate 0.001" in args.recipe


@pytest.mark.parametrize("name", [n for n in STAGES if MINIMIND2[n] != EXPECTED_UNDER_MINIMIND3[n]])
def test_a_flag_given_at_the_minimind2_default_value_wins(name):
    """Every flag of the row given at MiniMind2's value (which is also the parser's default): all of them stay."""
    want = as_flags(MINIMIND2[name])
    argv = ["--preset", "minimind3"] + [s for k, v in want.items() for s in (f"--{k}", str(v))]
    _, args = flags.parse_flags(STAGES[name].STAGE, argv)
    assert recipe_of(args, want) == want
    assert "given on the command line: " + ", ".join(f"--{k} {v:g}" for k, v in want.items()) in args.recipe


def test_the_recipe_line_says_what_was_applied():
    _, args = flags.parse_flags(sft.STAGE, ["--preset", "minimind3", "--max_seq_len", "512"])
    assert args.recipe == ("recipe: minimind-3's sft defaults for --preset minimind3 (epochs 2, batch_size 16, "
                           "learning_rate 1e-05, accumulation_steps 1); given on the command line: --max_seq_len 512")
    _, args = flags.parse_flags(reason.STAGE, ["--preset", "minimind3"])
    assert "MiniMind2's reason defaults" in args.recipe and "no reason recipe" in args.recipe


@pytest.mark.parametrize("name", STAGES)
def test_help_gives_both_defaults(name):
    text = " ".join(flags.build_parser(STAGES[name].STAGE).format_help().split())
    for k, v in as_flags(EXPECTED_UNDER_MINIMIND3[name]).items():
        default = as_flags(MINIMIND2[name])[k] if k in as_flags(MINIMIND2[name]) else None
        if default is not None and v != default:
            shown = f"{v:g}" if isinstance(v, float) else str(v)
            assert f"(default {default}; {shown} with --preset minimind3 / minimind3-moe)" in text, k
    if name == "reason":
        assert "minimind-3 publishes no reason recipe" in text


def test_minimind3_square_linears_are_q_proj_and_o_proj():
    """The LoRA row's "square linears: q_proj, o_proj" is what --lora_targets square picks at minimind-3's shape."""
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("minimind3", num_hidden_layers=1))
    assert sorted(n.rsplit(".", 1)[-1] for n in apply_lora(model, 16, targets="square")) == ["o_proj", "q_proj"]


def _spec_rows(name, heading):
    """The recipe table under `heading` in a spec: first cell -> the next five cells."""
    text = reference_folder(name).read_text(encoding="utf-8")
    table = [line for line in text.split(heading, 1)[1].split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    return {cells[0]: cells[1:6] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}


def _number(cell):
    return float(re.match(r"(?:actor )?([0-9.e-]+)", cell).group(1))


SPEC_ROWS = {"pretrain": "pretrain", "sft": "full SFT", "lora": "LoRA", "dpo": "DPO",
             "distill": "(white-box )?distillation", "grpo": "GRPO", "ppo": "PPO", "reason": "reasoning distillation"}


@pytest.mark.parametrize("spec, heading, table", [
    ("minimind3-spec.md", "## Training recipes (minimind-3 defaults)", MINIMIND3),
    ("minimind2-spec.md", "## Training recipes (MiniMind2 defaults)", MINIMIND2)])
def test_the_expected_tables_are_the_specs(spec, heading, table):
    rows = _spec_rows(spec, heading)
    checked = 0
    for name, row in table.items():
        match = [cells for first, cells in rows.items() if re.match(SPEC_ROWS[name], first)]
        if not match:
            continue  # GRPO / PPO in MiniMind2's spec: no row
        assert [_number(c) for c in match[0]] == list(row[:5]), name
        checked += 1
    assert checked == (7 if spec.startswith("minimind3") else 6)


@pytest.mark.usefixtures("one_thread")
def test_a_minimind3_run_resumes_with_the_recipe_it_started_with(demo_data, tmp_path, capsys):  # noqa: F811
    """--max_seq_len left to the recipe (340): the resume state records it, the same command line resumes, and a
    resume with another --max_seq_len is refused as before."""
    argv = tiny_flags(tmp_path, demo_data["sft"], steps=2, batch_size=2, preset="minimind3",
                      extra=["--from_weight", "none"])
    i = argv.index("--max_seq_len")
    argv = argv[:i] + argv[i + 2:]
    first = sft.main([*argv, "--stop_after", "1"])
    assert first["interrupted"] and first["steps"] == 1
    out = capsys.readouterr().out
    assert "recipe: minimind-3's sft defaults for --preset minimind3 (epochs 2, max_seq_len 768)" in out
    state = torch.load(first["resume_path"], weights_only=False)
    assert state["args"]["max_seq_len"] == 768 and state["args"]["epochs"] == 2
    with pytest.raises(engine.ConfigError, match="--max_seq_len 768, got --max_seq_len 512"):
        sft.main([*argv, "--from_resume", "1", "--max_seq_len", "512"])
    second = sft.main([*argv, "--from_resume", "1"])
    assert not second["interrupted"] and second["steps"] == 2
