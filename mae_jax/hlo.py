"""What a compiled program does, read from its optimized HLO text (`compiled.as_text()`), for `mae_jax.plan`.

XLA's cost analysis of a compiled module counts the body of a while loop (a scan over blocks, gradient
accumulation) once. This reads the module's computations and how often each runs (a while body: its trip count,
from the loop condition), and reports per step:
  - `collectives`: every cross-device collective by kind and element type, with its count and bytes (the larger
    of its operands and result per device), loop bodies multiplied. TPU's reduce-scatter is a fusion
    (`kind=kCustom, calls=%all-reduce-scatter...`) around an all-reduce and a slice: it is reported as a
    reduce-scatter;
  - `loop_factor`: how much the module's memory traffic grows when loop bodies count as often as they run (the
    bytes every top-level instruction reads and writes, summed with and without the trip counts): XLA's
    "bytes accessed" times this is the step's;
  - `largest_buffers`: the largest temporaries of an XLA buffer-assignment dump (`--xla_dump_to`), with the
    JAX operation that made each (its `op_name` metadata).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable

_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|f16|bf16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "s16": 16, "u16": 16,
         "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64,
         "c128": 128}
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_NOT_MEMORY = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "copy-done", "opt-barrier"}


def arrays(shape: str) -> list[tuple[str, int]]:
    """(element type, bytes) of every array in an HLO shape, e.g. "(f32[2,3]{1,0}, bf16[4])"."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        elements = 1
        for d in filter(None, dims.split(",")):
            elements *= int(d)
        out.append((dtype, elements * _BITS[dtype] // 8))
    return out


def nbytes(shape: str) -> int:
    return sum(size for _, size in arrays(shape))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    arguments: str  # the text between the opcode's parentheses (a constant's value)
    attributes: str

    def called(self, key: str) -> list[str]:
        """Computations named by attribute `key` (calls, body, condition, to_apply, branch_computations)."""
        match = re.search(rf"\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)", self.attributes)
        return re.findall(r"%([\w.\-]+)", match.group(1)) if match else []

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""


def _split_shape(text: str) -> tuple[str, str]:
    """"(a, (b)) opcode(...)" or "f32[2]{0} opcode(...)" -> (shape, rest)."""
    if text.startswith("("):
        depth = 0
        for i, c in enumerate(text):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                return text[:i + 1], text[i + 1:].lstrip()
    shape, _, rest = text.partition(" ")
    return shape, rest


def _instruction(line: str) -> Instruction | None:
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if not match:
        return None
    shape, rest = _split_shape(match.group(2))
    opcode_match = re.match(r"([\w\-]+)\(", rest)
    if not opcode_match:
        return None
    depth, start = 0, opcode_match.end() - 1
    for i in range(start, len(rest)):
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        if depth == 0:
            break
    operands = re.findall(r"%([\w.\-]+)", rest[start:i + 1])
    return Instruction(match.group(1), shape, opcode_match.group(1), operands, rest[start + 1:i], rest[i + 1:])


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str

    @classmethod
    def parse(cls, text: str) -> "Module":
        computations, entry, current = {}, None, None
        for line in text.splitlines():
            header = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
            if header:
                current = computations.setdefault(header.group(2), [])
                entry = header.group(2) if header.group(1) else entry
            elif line.startswith("}"):
                current = None
            elif current is not None and (instruction := _instruction(line)):
                current.append(instruction)
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        return cls(computations, entry)

    def trip_count(self, condition: str) -> int | None:
        """The trip count of a while loop from its condition `i < N` (or <= N) on an induction variable from 0."""
        instructions = {i.name: i for i in self.computations.get(condition, [])}
        root = next((i for i in reversed(self.computations.get(condition, [])) if i.opcode == "compare"), None)
        if root is None:
            return None
        direction = re.search(r"direction=(\w+)", root.attributes)
        for k, name in enumerate(root.operands):
            constant = instructions.get(name)
            if constant is not None and constant.opcode == "constant":
                if not re.fullmatch(r"-?\d+", constant.arguments.strip()):
                    return None
                n = int(constant.arguments)
                kind = direction.group(1) if direction else "LT"
                if k == 0:  # N > i is i < N
                    kind = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(kind, kind)
                return {"LT": n, "LE": n + 1, "NE": n}.get(kind)
        return None

    def execution_counts(self) -> tuple[dict[str, int], list[int]]:
        """How often each computation runs per execution of the module (scalar reducers excluded), and the trip
        counts of its while loops."""
        counts: dict[str, int] = collections.Counter({self.entry: 1})
        trips = []
        order = [self.entry]
        for name in order:  # callers before callees: HLO has no recursion
            for instruction in self.computations.get(name, []):
                if instruction.opcode == "while":
                    trip = self.trip_count(instruction.called("condition")[0])
                    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
                    trip = trip if trip is not None else int(known.group(1)) if known else 1
                    trips.append(trip)
                    callees = [(c, trip) for c in instruction.called("body")]
                else:
                    callees = [(c, 1) for key in ("calls", "branch_computations") for c in instruction.called(key)]
                for callee, times in callees:
                    if callee not in counts:
                        order.append(callee)
                    counts[callee] += counts[name] * times
        return dict(counts), trips


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVES
    dtype: str
    count: int  # per step
    bytes: int  # per step and device: the larger of operands and result


@dataclasses.dataclass
class Analysis:
    collectives: list[Collective]
    loop_trip_counts: list[int]
    loop_factor: float  # memory traffic with loop bodies counted as often as they run / counted once


def analyze(text: str) -> Analysis:
    """Collectives, loops and the loop factor of a compiled module's HLO text (see the module docstring)."""
    module = Module.parse(text)
    counts, trips = module.execution_counts()
    reduce_scatter = {c for name in module.computations for i in module.computations[name]
                      for c in i.called("calls") if c.startswith("all-reduce-scatter")}
    totals: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    traffic = {True: 0.0, False: 0.0}
    for name, instructions in module.computations.items():
        if name not in counts:
            continue
        shapes = {i.name: i.shape for i in instructions}
        fused = name.startswith(("fused_", "fusion")) or name in reduce_scatter
        for instruction in instructions:
            kind = instruction.opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                kind = "reduce-scatter" if name in reduce_scatter and kind == "all-reduce" else kind
                operands = [shapes.get(o, "") for o in instruction.operands]
                by_dtype = collections.Counter()
                for dtype, size in arrays(instruction.shape):
                    by_dtype[dtype] += size
                operand_bytes = collections.Counter()
                for dtype, size in (a for s in operands for a in arrays(s)):
                    operand_bytes[dtype] += size
                for dtype in by_dtype | operand_bytes:
                    total = totals[(kind, dtype)]
                    total[0] += counts[name]
                    total[1] += counts[name] * max(by_dtype[dtype], operand_bytes[dtype])
            if not fused and instruction.opcode not in _NOT_MEMORY:
                moved = nbytes(instruction.shape) + sum(nbytes(shapes.get(o, "")) for o in instruction.operands)
                traffic[True] += counts[name] * moved
                traffic[False] += moved
    collectives = [Collective(kind, dtype, count, size) for (kind, dtype), (count, size) in sorted(totals.items())]
    return Analysis(collectives, trips, traffic[True] / traffic[False] if traffic[False] else 1.0)


def kernel_traffic(text: str) -> float:
    """Bytes a compiled module reads and writes per execution, estimated from its HLO text as the operands and
    results of every top-level instruction (on a GPU each is a kernel or a library call: a fusion, a cuBLAS
    gemm, a collective, a copy), loop bodies counted as often as they run. For targets whose compiler gives no
    cost analysis (XLA:GPU's compile-only executables). A custom call's result tuple counts its first array only
    (the rest is scratch space, e.g. cuBLAS's workspace); an async op counts at its start."""
    module = Module.parse(text)
    counts, _ = module.execution_counts()
    inside = {c for instructions in module.computations.values() for i in instructions if i.opcode == "fusion"
              for c in i.called("calls")}
    pending = list(inside)
    while pending:  # computations called from inside a fusion are inside it too
        for instruction in module.computations.get(pending.pop(), []):
            for callee in instruction.called("calls"):
                if callee not in inside:
                    inside.add(callee)
                    pending.append(callee)
    total = 0.0
    for name, instructions in module.computations.items():
        if name not in counts or name in inside:
            continue
        shapes = {i.name: i.shape for i in instructions}
        for instruction in instructions:
            if instruction.opcode in _NOT_MEMORY or instruction.opcode.endswith("-done"):
                continue
            written = arrays(instruction.shape)
            if instruction.opcode == "custom-call":
                written = written[:1]
            read = sum(nbytes(shapes.get(o, "")) for o in instruction.operands)
            total += counts[name] * (sum(size for _, size in written) + read)
    return total


# ---------------------------------------------------------------------------------------------------------
# Buffer assignment dumps.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Buffer:
    bytes: int
    shape: str
    op_name: str  # the JAX operation that wrote it (its HLO metadata), shortened


def largest_buffers(buffer_assignment: str, hlo_text: str, count: int = 8) -> list[Buffer]:
    """The `count` largest values placed in the temporary allocations of an XLA buffer-assignment dump
    (`*after_optimizations-buffer-assignment.txt`), one per instruction, with their JAX op_name."""
    op_names = {}
    for computation in Module.parse(hlo_text).computations.values():
        for instruction in computation:
            op_names[instruction.name] = instruction.op_name
    values, temporary = {}, False
    for line in buffer_assignment.splitlines():
        if line.startswith("allocation"):
            temporary = "preallocated-temp" in line
        elif temporary and (match := re.match(r"\s*value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=(\d+),"
                                              r"offset=\d+\): (.*)$", line)):
            name, size, shape = match.group(1), int(match.group(2)), match.group(3)
            if size > values.get(name, (0, ""))[0]:
                values[name] = (size, re.sub(r"\{[^}]*\}", "", shape).strip())
    ranked = sorted(values.items(), key=lambda item: -item[1][0])[:count]
    return [Buffer(size, shape, short_op_name(op_names.get(name, name))) for name, (size, shape) in ranked]


def peak_buffers(live_range: str, hlo_text: str) -> tuple[int, list[Buffer]]:
    """(the peak's bytes, the buffers live at it with the JAX operation that wrote each) from XLA's live-range
    dump (`*after_optimizations-live-range.txt`, "Live ranges at N (peak)"): what fills the memory at its
    highest point, as opposed to the largest buffers, which need not be live together."""
    op_names, shapes = {}, {}
    for computation in Module.parse(hlo_text).computations.values():
        for instruction in computation:
            op_names[instruction.name] = instruction.op_name
            shapes[instruction.name] = instruction.shape
    buffers, peak, inside = [], 0, False
    for line in live_range.splitlines():
        if re.match(r"\s*Live ranges at \d+ \(peak\):", line):
            inside = True
            continue
        if not inside:
            continue
        match = re.match(r"\s*([\w.\-]+)\{[\d,]*\}: (\d+) bytes \(cumulative: (\d+) bytes\)", line)
        if match is None:
            break
        name, size = match.group(1), int(match.group(2))
        peak = int(match.group(3))
        shape = re.sub(r"\{[^}]*\}", "", shapes.get(name, "")).strip()
        buffers.append(Buffer(size, shape, short_op_name(op_names.get(name, name))))
    return peak, buffers


def short_op_name(op_name: str) -> str:
    """A JAX op_name without the jit wrapper and module class prefixes: "backward: encoder/blocks_3/attn/qkv"."""
    backward = "transpose(" in op_name
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    while True:  # unwrap transpose(jvp(...)) from the inside out
        unwrapped = re.sub(r"(transpose|jvp|vmap|remat|checkpoint)\(([^()]*)\)", r"\2", name)
        if unwrapped == name:
            break
        name = unwrapped
    name = re.sub(r"\b[A-Z]\w*\.\w+/", "", name)  # MaskedAutoencoderViT.encode/
    name = re.sub(r"\b(MaskedAutoencoderViT|ViTClassifier|while/body/closed_call)/", "", name)
    return ("backward: " if backward else "") + name


def format_collectives(collectives: Iterable[Collective]) -> str:
    return ", ".join(f"{c.kind} {c.dtype} x{c.count} ({c.bytes / 2**20:,.1f} MiB)" for c in collectives) or "none"
