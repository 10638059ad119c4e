"""The optimized HLO module that `compiled.as_text()` prints, parsed into computations whose instructions keep their
schedule order: names, opcodes, operands, result arrays, attributes (read on demand) and static loop trip counts."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

# Bytes per element by HLO element type; sub-byte types pack (s4: half a byte).
ITEM_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
              "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
              "c128": 16, "token": 0}
_ARRAY = re.compile(r"(?<![\w.])([a-z][a-z0-9]*)\[([0-9,<=]*)\](?:\{([^}]*)\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_INSTRUCTION = re.compile(r"\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_HEADER = re.compile(r"(ENTRY\s+)?%?([^\s(]+)")
_SPECIAL = re.compile(r'[{}\[\]()",\\]')   # what brackets, strings and separators are made of
_NAME = re.compile(r"%([\w.\-]+)")


def ints(text: str) -> list[int]:
    """The integers in an attribute's text: '{1,2}' -> [1, 2]."""
    return [int(x) for x in re.findall(r"-?\d+", text)]


def item_bytes(dtype: str) -> float:
    """Bytes of one element; FP8 / FP4 types by their width (f8e4m3fn: 1, f4e2m1fn: 0.5)."""
    if dtype in ITEM_BYTES:
        return ITEM_BYTES[dtype]
    width = re.match(r"f(\d+)e", dtype)
    return int(width.group(1)) / 8 if width else 0


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of a result shape: element type, dimensions (a dynamic one at its bound), memory space (TPU: 1 is
    the on-chip vector memory) and `stored`, the dimensions as memory holds them (a TPU's tiled layout pads the most
    minor ones to its tile: f32[2,40]{1,0:T(8,128)} is stored as 8 × 128)."""
    dtype: str
    dims: tuple[int, ...]
    memory_space: int = 0
    stored: tuple[int, ...] | None = None

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> float:
        """Bytes as stored, padding included."""
        return math.prod(self.stored if self.stored is not None else self.dims) * item_bytes(self.dtype)


def _stored_dims(dims: tuple[int, ...], layout: str) -> tuple[int, ...] | None:
    """`dims` padded to the layout's first tile (`1,0:T(8,128)`: the most minor dimension to 128, the next to 8)."""
    tile = re.search(r"T\(([\d,]+)\)", layout)
    if not tile or not dims:
        return None
    minor_to_major = ints(layout.split(":")[0])
    stored = list(dims)
    for size, dim in zip(reversed(ints(tile.group(1))), minor_to_major):
        stored[dim] = -(-stored[dim] // size) * size
    return tuple(stored)


def parse_arrays(shape: str) -> tuple[Array, ...]:
    """The arrays of a shape's text, a tuple's flattened in order: 'bf16[8,4]{1,0}', '(f32[2], s32[])'."""
    arrays = []
    for m in _ARRAY.finditer(shape):
        dims = tuple(int(d.removeprefix("<=")) for d in m.group(2).split(",") if d)
        layout = m.group(3) or ""
        space = _MEMORY_SPACE.search(layout.partition(":")[2])
        arrays.append(Array(m.group(1), dims, int(space.group(1)) if space else 0, _stored_dims(dims, layout)))
    return tuple(arrays)


def _structure(text: str, separator: str = ",") -> tuple[list[int], int, bool]:
    """Where `separator` stands outside brackets and quoted strings (backslash escapes honoured), the bracket depth at
    the end of `text`, and whether a string is still open there."""
    cuts, depth, in_string, skip = [], 0, False, -1
    for m in _SPECIAL.finditer(text):
        j, c = m.start(), m.group()
        if j == skip:
            continue
        if in_string:
            if c == "\\":
                skip = j + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        elif c == separator and depth == 0:
            cuts.append(j)
    return cuts, depth, in_string


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """`text` split at `separator`s outside brackets and quoted strings."""
    bounds = [-1, *_structure(text, separator)[0], len(text)]
    parts = (text[a + 1:b].strip() for a, b in zip(bounds, bounds[1:]))
    return [p for p in parts if p]


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start` (parentheses, brackets and braces nest)."""
    depth = 0
    for j in range(start, len(text)):
        c = text[j]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction. `operand_text` is what stands between the opcode's parentheses (a constant's literal);
    `attribute_text` the rest of the line, parsed by `attributes` when first asked."""
    name: str
    opcode: str
    shape: str
    operands: tuple[str, ...]
    operand_text: str
    attribute_text: str
    is_root: bool = False

    @functools.cached_property
    def arrays(self) -> tuple[Array, ...]:
        return parse_arrays(self.shape)

    @property
    def nbytes(self) -> float:
        return sum(a.nbytes for a in self.arrays)

    @functools.cached_property
    def attributes(self) -> dict[str, str]:
        out = {}
        for part in split_top_level(self.attribute_text):
            key, _, value = part.partition("=")
            out[key.strip()] = value.strip()
        return out

    def attribute(self, key: str) -> str | None:
        return self.attributes.get(key)

    @functools.cached_property
    def backend_config(self) -> dict:
        """The JSON backend_config ({} when absent or not JSON, as for Mosaic GPU's)."""
        text = self.attribute("backend_config")
        if not text or not text.startswith("{"):
            return {}
        try:
            return json.loads(text)
        except ValueError:
            return {}

    def called(self, key: str) -> list[str]:
        """Computation names an attribute calls: `calls=%f`, `branch_computations={%a, %b}`."""
        return _NAME.findall(self.attribute(key) or "")


def parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    i = m.end()
    if line.startswith("(", i):
        end = _closing(line, i)
        shape, i = line[i:end + 1], end + 1
    else:
        end = line.find(" ", i)
        if end < 0:
            return None
        shape, i = line[i:end], end
    open_paren = line.find("(", i)
    if open_paren < 0:
        return None
    opcode = line[i:open_paren].strip()
    close = _closing(line, open_paren)
    operand_text = line[open_paren + 1:close]
    return Instruction(m.group(2).lstrip("%"), opcode, shape, tuple(_NAME.findall(operand_text)), operand_text,
                       line[close + 1:], bool(m.group(1)))


@dataclasses.dataclass(frozen=True)
class Computation:
    """A computation's instructions in the order the module lists them: for a scheduled module, the schedule."""
    name: str
    instructions: tuple[Instruction, ...]
    is_entry: bool = False

    @functools.cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @functools.cached_property
    def users(self) -> dict[str, list[Instruction]]:
        out: dict[str, list[Instruction]] = {}
        for instruction in self.instructions:
            for operand in instruction.operands:
                out.setdefault(operand, []).append(instruction)
        return out

    @property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.is_root), self.instructions[-1])

    def parameter(self, index: int) -> Instruction | None:
        return next((i for i in self.instructions if i.opcode == "parameter" and i.operand_text == str(index)), None)


@dataclasses.dataclass(frozen=True)
class Module:
    """The computations of an HLO module by name, and which is the entry; `num_partitions` from the header."""
    computations: dict[str, Computation]
    entry: str
    num_partitions: int = 1
    is_scheduled: bool = False

    @property
    def entry_computation(self) -> Computation:
        return self.computations[self.entry]

    def operand(self, computation: Computation, instruction: Instruction, index: int) -> Instruction:
        return computation.by_name[instruction.operands[index]]


def _is_complete(text: str) -> bool:
    """Whether every bracket and string opened in `text` is closed (an instruction may span lines: a kernel's
    attributes can hold raw newlines)."""
    _, depth, in_string = _structure(text)
    return depth <= 0 and not in_string


def parse_module(text: str) -> Module:
    """Every computation of `text` (what `compiled.as_text()` returns); the stack-frame tables after them are
    skipped."""
    computations, entry, current, lines, pending = {}, None, None, [], None
    header = text[:text.find("\n")] if "\n" in text else text
    partitions = re.search(r"num_partitions=(\d+)", header)
    for line in text.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{") and (
                    line.startswith("%") or line.startswith("ENTRY")):
                m = _HEADER.match(line)
                current, is_entry, lines = m.group(2), bool(m.group(1)), []
            continue
        if pending is not None:
            pending += "\n" + line
        elif line.startswith("}"):   # `}` or `}, execution_thread="sparsecore"`
            computations[current] = Computation(current, tuple(lines), is_entry)
            entry = current if is_entry else entry
            current = None
            continue
        else:
            pending = line
        if _is_complete(pending):
            instruction = parse_instruction(pending)
            if instruction is not None:
                lines.append(instruction)
            pending = None
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, entry, int(partitions.group(1)) if partitions else 1,
                  "is_scheduled=true" in header)


# ---------------------------------------------------------------------------------------------------------------
# Loop trip counts


def _scalar_constant(computation: Computation, name: str) -> int | None:
    instruction = computation.by_name.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert") and instruction.operands:
        instruction = computation.by_name.get(instruction.operands[0])
    if instruction is None or instruction.opcode != "constant":
        return None
    try:
        return int(instruction.operand_text.strip())
    except ValueError:
        return None


def _tuple_index_of(computation: Computation, name: str) -> int | None:
    """i when `name` is get-tuple-element(parameter(0)), index=i (through copies and converts)."""
    instruction = computation.by_name.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert") and instruction.operands:
        instruction = computation.by_name.get(instruction.operands[0])
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    source = computation.by_name.get(instruction.operands[0])
    if source is None or source.opcode != "parameter":
        return None
    return int(instruction.attribute("index"))


def trip_count(module: Module, parent: Computation, loop: Instruction) -> int | None:
    """A while loop's static trip count: XLA's `known_trip_count` where the backend records it (GPU), else read from
    the loop itself: the condition compares tuple element i with a constant, the init tuple sets element i to a
    constant and the body adds a constant step to it. None when the count is not static."""
    known = loop.backend_config.get("known_trip_count", {}).get("n")
    if known is not None:
        return int(known)
    condition = module.computations[loop.called("condition")[0]]
    body = module.computations[loop.called("body")[0]]
    compare = condition.root
    if compare.opcode != "compare" or len(compare.operands) != 2:
        return None
    direction = compare.attribute("direction")
    left, right = compare.operands
    index, bound = _tuple_index_of(condition, left), _scalar_constant(condition, right)
    if index is None:   # `bound > i` is `i < bound`
        index, bound = _tuple_index_of(condition, right), _scalar_constant(condition, left)
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    if index is None or bound is None:
        return None
    init_tuple = parent.by_name.get(loop.operands[0])
    if init_tuple is None or init_tuple.opcode != "tuple" or index >= len(init_tuple.operands):
        return None
    init = _scalar_constant(parent, init_tuple.operands[index])
    step = _loop_step(body, index)
    if init is None or step is None or step == 0:
        return None
    if direction == "LT" and step > 0:
        return max(0, -(-(bound - init) // step))
    if direction == "LE" and step > 0:
        return max(0, (bound - init) // step + 1)
    if direction == "GT" and step < 0:
        return max(0, -(-(init - bound) // -step))
    if direction == "GE" and step < 0:
        return max(0, (init - bound) // -step + 1)
    return None


def _loop_step(body: Computation, index: int) -> int | None:
    """The constant the body adds to tuple element `index` each iteration (None if it does anything else)."""
    root = body.root
    if root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = body.by_name.get(root.operands[index])
    if update is None or update.opcode not in ("add", "subtract") or len(update.operands) != 2:
        return None
    a, b = update.operands
    if _tuple_index_of(body, a) == index and (c := _scalar_constant(body, b)) is not None:
        return c if update.opcode == "add" else -c
    if update.opcode == "add" and _tuple_index_of(body, b) == index and (c := _scalar_constant(body, a)) is not None:
        return c
    return None
