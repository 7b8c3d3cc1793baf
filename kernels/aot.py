"""Ahead-of-time compilation of every Triton kernel for real GPUs (sm_80, sm_86, sm_90), on a machine without one.

    python -m kernels.aot --check                 # compile every registered case for cc 80, 86, 90; exit 1 on failure
    python -m kernels.aot --report [--json F]     # registers / spills (stack bytes) / shared memory per case, target
    python -m kernels.aot --check --shard 1/2     # every 2nd case from the 2nd: run N shards in parallel processes

It must run with TRITON_INTERPRET unset: under the interpreter `@triton.jit` gives InterpretedFunctions, which
triton.compile cannot take (tests/test_aot_compile.py runs this module in a subprocess for that reason).

Adding a kernel (one function and one registry line):

    def _my_op_cases():
        from kernels import my_op as m                       # import inside, so a half-written file breaks only it
        for shape in ...MiniMind2 shapes (see HIDDEN, HEADS, VOCAB)...:
            block, warps = m.my_op_config(shape)             # the wrapper's own config helper: never re-derive it
            yield AOTCase(f"my_op_fwd[...]", m._my_op_fwd_kernel,
                          types={"X": "*bf16", "n": "i32", ...},   # every non-constexpr argument of the kernel
                          constexprs={"BLOCK": block}, num_warps=warps, divisible_by_16=("n",))

    CASES["my_op"] = _my_op_cases      # (or add it to the dict literal below)

A config may depend on the model's sizes, never on the number of tokens: under torch.compile a batch dimension
that varies becomes symbolic; a num_warps computed from it crashes Dynamo, and a constexpr makes it recompile for
every value (and run eagerly past the recompile limit). tests/test_compile_triton.py traces that.
Cases that come out identical (same kernel, types, constexprs, warps, stages) are compiled once, so name a case by
its configuration (BLOCK=..., dtypes), not by the shape that chose it. Pointers are compiled as 16-byte aligned
(torch allocations are), and the int arguments listed in divisible_by_16 as multiples of 16, the way the JIT
specialises them at these shapes; so the registers and spills reported are the ones a GPU run gets.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from minimind.config import PRESETS, MiniMindConfig

TARGETS = (80, 86, 90)  # A100, RTX 3090 / A10, H100 / H200
_PRESETS = [MiniMindConfig.from_preset(name) for name in PRESETS]
HIDDEN = sorted({c.hidden_size for c in _PRESETS})                                    # 512, 640, 768
# (q heads, kv heads, head dim): MiniMind2's 8/2 of 64, 80, 96 and minimind-3's 8/4 of 96
HEADS = sorted({(c.num_attention_heads, c.num_key_value_heads, c.head_dim) for c in _PRESETS})
VOCAB = sorted({c.vocab_size for c in _PRESETS})                                      # 6400
# (activation dtype, weight dtype): mixed-precision training keeps fp32 weights; a bf16 model has bf16 weights.
DTYPES = (("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"))
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class AOTCase:
    name: str                  # what the report calls it: kernel[config,dtypes], e.g. "swiglu_fwd[BLOCK=4096,bf16]"
    fn: object                 # the @triton.jit function
    types: dict                # argument name -> "*bf16" | "*fp32" | "i32" | "fp32" ... for each non-constexpr arg
    constexprs: dict           # argument name -> value for each tl.constexpr arg
    num_warps: int
    num_stages: int = 3
    divisible_by_16: tuple = field(default=())  # int arguments that are multiples of 16 at these shapes

    def key(self):
        return (self.fn.__name__, tuple(sorted(self.types.items())), tuple(sorted(self.constexprs.items())),
                self.num_warps, self.num_stages, tuple(sorted(self.divisible_by_16)))


def _rms_norm_cases():
    from kernels import rms_norm as m
    for H in HIDDEN:
        for xt, wt in DTYPES:
            # residual in x's dtype, or in fp32 (under autocast the residual stream is fp32, the sublayers' bf16);
            # h and y come out in the promoted dtype ot, which also sets the block and warps. The backward stores
            # x's gradient in x's dtype and, where the residual's dtype differs, the residual's in that dtype
            for residual, rt in ((False, xt), (True, xt), (True, "fp32")):
                ot = "fp32" if rt == "fp32" else xt
                block, warps = m.rms_norm_config(H, BYTES[ot])
                yield AOTCase(f"rms_norm_fwd[BLOCK={block},{xt}/{wt}{f',residual {rt}' if residual else ''}]",
                              m._rms_norm_fwd_kernel,
                              types={"X": f"*{xt}", "R": f"*{rt}", "H": f"*{ot}", "W": f"*{wt}", "Y": f"*{ot}",
                                     "RSTD": "*fp32", "n_cols": "i32", "eps": "fp32"},
                              constexprs={"HAS_RESIDUAL": residual, "BLOCK": block}, num_warps=warps,
                              divisible_by_16=("n_cols",))
                has_dr = rt != xt
                yield AOTCase(f"rms_norm_bwd[BLOCK={block},{ot}/{wt}{',dh' if residual else ''}"
                              f"{f',dx {xt},dr {rt}' if has_dr else ''}]", m._rms_norm_bwd_kernel,
                              types={"DY": f"*{ot}", "X": f"*{ot}", "W": f"*{wt}", "RSTD": "*fp32", "DH": f"*{ot}",
                                     "DX": f"*{xt}", "DR": f"*{rt}", "DW_PARTIAL": "*fp32", "n_rows": "i32",
                                     "n_cols": "i32"},
                              constexprs={"HAS_DH": residual, "HAS_DR": has_dr, "BLOCK": block}, num_warps=warps,
                              divisible_by_16=("n_cols",))


def _rope_cases():
    from kernels import rope as m
    for n_q, n_kv, D in HEADS:
        block_hq, block_hkv, block_half, warps = m.rope_config(n_q, n_kv, D)
        for xt, _ in DTYPES[:3]:
            for backward in (False, True):
                ints = ("seq_len", "offset", "q_sb", "q_st", "q_sh", "k_sb", "k_st", "k_sh", "cos_stride",
                        "n_q_heads", "n_kv_heads", "half")
                yield AOTCase(f"rope_{'bwd' if backward else 'fwd'}[BLOCK_HQ={block_hq},BLOCK_HKV={block_hkv},"
                              f"BLOCK_HALF={block_half},{xt}]", m._rope_kernel,
                              types={"Q": f"*{xt}", "K": f"*{xt}", "QO": f"*{xt}", "KO": f"*{xt}", "COS": "*fp32",
                                     "SIN": "*fp32", **{name: "i32" for name in ints}},
                              constexprs={"BACKWARD": backward, "BLOCK_HQ": block_hq, "BLOCK_HKV": block_hkv,
                                          "BLOCK_HALF": block_half},
                              num_warps=warps, divisible_by_16=("q_sb", "q_st", "k_sb", "k_st", "cos_stride"))


def _qk_norm_rope_cases():
    """Every head shape of the presets (minimind-3's 8/4 of 96, and MiniMind2's with --qk_norm 1), activations in
    each dtype with fp32 norm weights (mixed precision) or bf16 ones (a bf16 model)."""
    from kernels import qk_norm_rope as m
    for n_q, n_kv, D in HEADS:
        block_hq, block_hkv, block_half, warps, bwd_warps = m.qk_norm_rope_config(n_q, n_kv, D)
        blocks = {"BLOCK_HQ": block_hq, "BLOCK_HKV": block_hkv, "BLOCK_HALF": block_half}
        label = ",".join(f"{k}={v}" for k, v in blocks.items())
        strides = ("q_sb", "q_st", "q_sh", "k_sb", "k_st", "k_sh", "cos_stride")  # multiples of D, and of 16
        ints = (*strides, "seq_len", "offset", "n_q_heads", "n_kv_heads", "half")
        div16 = strides + (("half",) if D // 2 % 16 == 0 else ())
        for xt, wt in DTYPES:
            common = {"Q": f"*{xt}", "K": f"*{xt}", "QW": f"*{wt}", "KW": f"*{wt}", "COS": "*fp32", "SIN": "*fp32",
                      **{name: "i32" for name in ints}, "eps": "fp32"}
            yield AOTCase(f"qk_norm_rope_fwd[{label},half={D // 2},{xt}/{wt}]", m._qk_norm_rope_fwd_kernel,
                          types={**common, "QO": f"*{xt}", "KO": f"*{xt}"}, constexprs=blocks, num_warps=warps,
                          divisible_by_16=div16)
            yield AOTCase(f"qk_norm_rope_bwd[{label},half={D // 2},{xt}/{wt}]", m._qk_norm_rope_bwd_kernel,
                          types={**common, "DQO": f"*{xt}", "DKO": f"*{xt}", "DQ": f"*{xt}", "DK": f"*{xt}",
                                 "DQW_PARTIAL": "*fp32", "DKW_PARTIAL": "*fp32", "n_tokens": "i32"},
                          constexprs=blocks, num_warps=bwd_warps, divisible_by_16=div16)


def _swiglu_cases():
    from kernels import swiglu as m
    block, warps = m.SWIGLU_CONFIG
    for xt, _ in DTYPES[:3]:
        yield AOTCase(f"swiglu_fwd[BLOCK={block},{xt}]", m._swiglu_fwd_kernel,
                      types={"G": f"*{xt}", "U": f"*{xt}", "Y": f"*{xt}", "n_elements": "i32"},
                      constexprs={"BLOCK": block}, num_warps=warps, divisible_by_16=("n_elements",))
        yield AOTCase(f"swiglu_bwd[BLOCK={block},{xt}]", m._swiglu_bwd_kernel,
                      types={"DY": f"*{xt}", "G": f"*{xt}", "U": f"*{xt}", "DG": f"*{xt}", "DU": f"*{xt}",
                             "n_elements": "i32"},
                      constexprs={"BLOCK": block}, num_warps=warps, divisible_by_16=("n_elements",))


def _linear_cross_entropy_cases():
    from kernels import linear_cross_entropy as m
    for V in VOCAB:
        block_r, block_v, warps = m.cross_entropy_config(V)
        for xt in ("bf16", "fp16", "fp32"):
            for write_grad in (False, True):
                yield AOTCase(f"cross_entropy_rows[V={V},R={block_r},{xt}{',grad' if write_grad else ''}]",
                              m._cross_entropy_rows_kernel,
                              types={"logits_ptr": f"*{xt}", "stride_row": "i32", "labels_ptr": "*i64",
                                     "coef_ptr": "*fp32", "loss_ptr": "*fp32", "n_rows": "i32", "n_vocab": "i32",
                                     "ignore_index": "i32", "z_loss": "fp32"},
                              constexprs={"WRITE_GRAD": write_grad, "BLOCK_R": block_r, "BLOCK_V": block_v},
                              num_warps=warps, divisible_by_16=("stride_row", "n_vocab") if V % 16 == 0 else ())


def _moe_cases():
    """kernels/moe.py: its tiles depend only on the element size (moe.TILES); the combine block on the hidden size."""
    import itertools

    import torch
    from kernels import moe as m
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for dtype, t in names.items():  # x and the expert weights share a dtype (autocast casts both)
        flags = m._dot_flags(dtype)

        def case(kernel, tiles, label, fn, types, constexprs, div16):
            cfg = f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k},w{tiles.num_warps},s{tiles.num_stages}"
            return AOTCase(f"moe_{kernel}[{cfg},{label}{t}]", fn, types={**types},
                           constexprs={**constexprs, **flags, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
                                       "BLOCK_K": tiles.block_k},
                           num_warps=tiles.num_warps, num_stages=tiles.num_stages, divisible_by_16=div16)

        ints = ("H", "I", "E", "K", "stride_x", "stride_dout", "stride_dw_part")
        for backward in (False, True):
            # the forward passes placeholders for the backward-only pointers: x, w_gate, perm, h, h, h
            types = {"X": f"*{t}", "W_GATE": f"*{t}", "W_UP": f"*{t}", "PERM": "*i32", "OFFSETS": "*i32",
                     "H_OUT": f"*{t}", "DOUT": f"*{t}", "W_DOWN": f"*{t}", "TOPK_W": "*fp32" if backward else "*i32",
                     "DG": f"*{t}", "DU": f"*{t}", "DW_PART": "*fp32" if backward else f"*{t}",
                     **{n: "i32" for n in ints}}
            tiles = m.TILES["gate_up_backward" if backward else "gate_up"][BYTES[t]]
            yield case("gate_up_bwd" if backward else "gate_up_fwd", tiles, "", m._gate_up_kernel, types,
                       {"BACKWARD": backward}, ("H", "I", "stride_x", "stride_dout"))
        tiles = m.TILES["rows_to_slots"][BYTES[t]]
        for two, unit_stride in ((False, "stride_b_r"), (True, "stride_b_c")):  # y = h Wd^T; dx = dg Wg + du Wu
            ints = [n for n in ("R", "C", "E", "stride_a", "stride_b_expert", "stride_b_r", "stride_b_c", "stride_out")
                    if n != unit_stride]
            types = {"A1": f"*{t}", "B1": f"*{t}", "A2": f"*{t}", "B2": f"*{t}", "PERM": "*i32", "OFFSETS": "*i32",
                     "OUT": f"*{t}", **{n: "i32" for n in ints}}
            yield case("rows_to_slots", tiles, "two," if two else "", m._rows_to_slots_kernel, types,
                       {"TWO": two, unit_stride: 1}, tuple(n for n in ints if n != "E"))
        tiles = m.TILES["weight_grad"][BYTES[t]]
        for a_gather in (False, True):  # dWg, dWu: gathered x; dWd: gathered, weighted dout
            types = {"A": f"*{t}", "B": f"*{t}", "PERM": "*i32", "TOPK_W": "*fp32", "OFFSETS": "*i32",
                     "DW": f"*{t}", **{n: "i32" for n in ("P", "Q", "K", "stride_a", "stride_b", "stride_dw_expert")}}
            yield case("weight_grad", tiles, "gather_a," if a_gather else "gather_b,", m._weight_grad_kernel, types,
                       {"A_GATHER": a_gather, "B_GATHER": not a_gather},
                       ("P", "Q", "stride_a", "stride_b", "stride_dw_expert"))
        for H, weighted in itertools.product(HIDDEN, (False, True)):  # out = sum_k w y_s; dx = sum_k dx_s
            block = m.combine_block(H)
            yield AOTCase(f"moe_combine[BLOCK={block},{'weighted,' if weighted else ''}{t}]", m._combine_kernel,
                          types={"SLOTS": f"*{t}", "TOPK_W": "*fp32" if weighted else f"*{t}", "OUT": f"*{t}",
                                 "C": "i32", "K": "i32", "stride_slots": "i32", "stride_out": "i32"},
                          constexprs={"WEIGHTED": weighted, "BLOCK": block}, num_warps=4,
                          divisible_by_16=("C", "stride_slots", "stride_out"))


# kernel file -> generator of its cases. Other kernel files register here (see the module docstring).
CASES = {
    "rms_norm": _rms_norm_cases,
    "rope": _rope_cases,
    "qk_norm_rope": _qk_norm_rope_cases,
    "swiglu": _swiglu_cases,
    "linear_cross_entropy": _linear_cross_entropy_cases,
    "moe": _moe_cases,
}


def cases(kernels=None):
    """The unique AOTCases of the named kernel files (all registered ones by default)."""
    seen, out = set(), []
    for name in kernels or CASES:
        if name not in CASES:
            raise ValueError(f"kernels/aot.py: no kernel {name!r} registered; registered: {sorted(CASES)}")
        for case in CASES[name]():
            if case.key() not in seen:
                seen.add(case.key())
                out.append(case)
    return out


def _ast_source(case):
    """An ASTSource for the case: signature and constexprs keyed by argument name, attrs by (index,) (the form
    triton 3.6 through 3.9 take)."""
    from triton.compiler import ASTSource
    names = list(case.fn.arg_names)
    missing = [n for n in names if n not in case.types and n not in case.constexprs]
    extra = [n for n in list(case.types) + list(case.constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"kernels/aot.py: case {case.name}: arguments missing {missing}, unknown {extra}")
    signature = {n: "constexpr" if n in case.constexprs else case.types[n] for n in names}
    aligned = [i for i, n in enumerate(names)
               if n in case.types and (case.types[n].startswith("*") or n in case.divisible_by_16)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(fn=case.fn, signature=signature, constexprs=dict(case.constexprs), attrs=attrs)


def compile_case(case, cc):
    """triton.compile the case for compute capability cc (80, 86, 90). Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    return triton.compile(_ast_source(case), target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"kernels/aot.py: no cuobjdump in the triton wheel at {path}")
    return path


def resource_usage(compiled):
    """{"registers", "stack", "shared", "local"} of a compiled kernel, read from its cubin with `cuobjdump -res-usage`
    (stack = bytes of spilled registers; shared = static shared memory; metadata_shared = what Triton allocates)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"kernels/aot.py: cannot parse cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local,
            "metadata_shared": int(compiled.metadata.shared)}


def run(kernels=None, targets=TARGETS, report=False, log=print, shard=(0, 1)):
    """Compile every case for every target. Returns (rows, failures): rows are dicts (case, cc, seconds and, with
    report, the resource usage); failures are (case name, cc, error text). shard (k, n): only cases k, k + n, ...
    (so n processes can share the work)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels/aot.py: TRITON_INTERPRET=1 is set; AOT compilation needs the real compiler. "
                           "Run `env -u TRITON_INTERPRET python -m kernels.aot ...`")
    rows, failures = [], []
    for case in cases(kernels)[shard[0]::shard[1]]:
        for cc in targets:
            t0 = time.perf_counter()
            try:
                compiled = compile_case(case, cc)
                row = {"case": case.name, "cc": cc, "num_warps": case.num_warps,
                       "seconds": round(time.perf_counter() - t0, 3)}
                if report:
                    row.update(resource_usage(compiled))
                rows.append(row)
            except Exception as e:  # report every failing case, not just the first
                failures.append((case.name, cc, f"{type(e).__name__}: {e}"))
                log(f"FAIL {case.name} sm_{cc}: {type(e).__name__}: {str(e)[:2000]}")
    return rows, failures


def format_report(rows):
    """A markdown table of the report rows; spills (stack > 0) are flagged."""
    lines = ["| kernel case | sm | warps | registers | spill stack (B) | shared (B) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        flag = " **SPILLS**" if r["stack"] or r["local"] else ""
        lines.append(f"| {r['case']} | {r['cc']} | {r['num_warps']} | {r['registers']} | {r['stack']}{flag} | "
                     f"{max(r['shared'], r['metadata_shared'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compile every case; exit 1 if any fails")
    p.add_argument("--report", action="store_true", help="also read registers / spills / shared memory")
    p.add_argument("--kernels", nargs="*", default=None, help=f"kernel files to compile (default all: {list(CASES)})")
    p.add_argument("--cc", nargs="*", type=int, default=list(TARGETS), help="compute capabilities")
    p.add_argument("--json", default=None, help="write the rows (and failures) to this JSON file")
    p.add_argument("--shard", default="0/1", help="K/N: compile only every N-th case starting at K (parallel runs)")
    args = p.parse_args(argv)
    if not (args.check or args.report):
        p.error("say --check and/or --report")
    t0 = time.perf_counter()
    k, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= k < n:
        p.error(f"--shard K/N needs 0 <= K < N, got {args.shard}")
    rows, failures = run(args.kernels, args.cc, report=args.report, shard=(k, n))
    if args.report:
        print(format_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "failures": failures}, f, indent=1)
    spills = [r for r in rows if r.get("stack") or r.get("local")]
    print(f"{len(rows)} compiled, {len(failures)} failed, {len(spills)} spill"
          f"{'' if args.report else ' (not measured: use --report)'}; {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
