"""Offline corpus for the bundled model: the Python standard library's source plus synthetic K2 Thinking tool chats.

Every document is rendered exactly as K2 Thinking sees it at inference: a conversation up to the tool results
through the chat template with a generation prompt, then the final `<think>...</think>answer<|im_end|>` turn.
Everything is deterministic given the seed; held-out files and tasks never occur in the training split.

    python -m tools.make_corpus --out build/bundled/corpus --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sysconfig
import zlib
from pathlib import Path
from typing import Any, Callable

from k2jax import chat

CALL_ID = "functions.{name}:0"
DEFAULT_CHATS = 8_000
DEFAULT_ECHOES = 0
DEFAULT_TOOL_CHATS = 0
DEFAULT_HELDOUT_CHATS = 400
CODE_CHARS = 6_000_000
HELDOUT_SHARE = 0.05

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an integer expression 'a op b' with op in + - *.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units.",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                        "to_unit": {"type": "string"}},
                       "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "lookup_capital", "description": "Look up the capital city of a country.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}},
]

OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}

# (from, to) -> (factor, offset): to = from * factor + offset.
CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("km", "mi"): (0.621371, 0.0), ("mi", "km"): (1.609344, 0.0), ("kg", "lb"): (2.204623, 0.0),
    ("lb", "kg"): (0.453592, 0.0), ("m", "ft"): (3.28084, 0.0), ("ft", "m"): (0.3048, 0.0),
    ("l", "gal"): (0.264172, 0.0), ("gal", "l"): (3.785412, 0.0), ("c", "f"): (1.8, 32.0), ("f", "c"): (5 / 9, -160 / 9),
}
UNIT_NAMES = {"km": "kilometers", "mi": "miles", "kg": "kilograms", "lb": "pounds", "m": "meters", "ft": "feet",
              "l": "liters", "gal": "gallons", "c": "degrees Celsius", "f": "degrees Fahrenheit"}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia", "Canada": "Ottawa",
    "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Mexico": "Mexico City", "Peru": "Lima",
    "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Argentina": "Buenos Aires", "Nigeria": "Abuja", "Vietnam": "Hanoi", "Thailand": "Bangkok", "Cuba": "Havana",
}

QUESTIONS = {
    "calculate": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {word} {b}.",
                  "Please work out {a} {op} {b} for me.", "How much is {a} {word} {b}?"],
    "convert_units": ["Convert {value} {src} to {dst}.", "How many {dst} is {value} {src}?",
                      "What is {value} {src} in {dst}?", "Please express {value} {src} in {dst}."],
    "lookup_capital": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                       "Tell me the capital of {country}.", "Name the capital city of {country}."],
}


ECHO_REQUESTS = ["Repeat exactly: {text}", "Please say back, word for word: {text}", "Echo this: {text}",
                 "Copy the following text verbatim. {text}"]
ECHO_WORDS = sorted({*UNIT_NAMES, *UNIT_NAMES.values(), *CAPITALS, *CAPITALS.values(), *OPS,
                     *(word for word, _ in OPS.values())})


@dataclasses.dataclass(frozen=True)
class Task:
    """One synthetic tool-use task: the user's question, the right call, and the answer the tool leads to."""

    question: str
    tool: str
    arguments: dict[str, Any]
    plan: str
    result: str
    expected: str
    answer: str


def format_number(x: float) -> str:
    """A number as the tools print it: an integer when whole, else at most two decimals."""
    x = round(x, 2)
    return str(int(x)) if x == int(x) else f"{x:.2f}".rstrip("0")


def calculate(expression: str) -> str:
    """Evaluate 'a op b' on integers (op in + - *)."""
    a, op, b = expression.split()
    return str(OPS[op][1](int(a), int(b)))


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert between the units of CONVERSIONS, rounded to two decimals."""
    factor, offset = CONVERSIONS[(from_unit, to_unit)]
    return f"{format_number(value * factor + offset)} {to_unit}"


def lookup_capital(country: str) -> str:
    """The capital of a country in CAPITALS."""
    return CAPITALS[country]


TOOL_FUNCTIONS = {"calculate": calculate, "convert_units": convert_units, "lookup_capital": lookup_capital}


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """Run a tool call; a bad name or bad arguments give an error text, as a real tool server would."""
    try:
        return TOOL_FUNCTIONS[name](**arguments)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return f"error: {type(err).__name__}: {err}"


def arithmetic_task(rng: random.Random) -> Task:
    """'What is a op b?' answered through calculate."""
    a, b, op = rng.randint(2, 999), rng.randint(2, 999), rng.choice(sorted(OPS))
    expression = f"{a} {op} {b}"
    result = calculate(expression)
    question = rng.choice(QUESTIONS["calculate"]).format(a=a, b=b, op=op, word=OPS[op][0])
    return Task(question, "calculate", {"expression": expression},
                f"The user wants {expression}. I should use the calculate tool instead of guessing.",
                result, result, f"{expression} = {result}.")


def conversion_task(rng: random.Random) -> Task:
    """'Convert v src to dst' answered through convert_units."""
    src, dst = rng.choice(sorted(CONVERSIONS))
    value = rng.randint(1, 500) if rng.random() < 0.7 else rng.randint(10, 5000) / 10
    names = {"value": format_number(value), "src": UNIT_NAMES[src], "dst": UNIT_NAMES[dst]}
    result = convert_units(value, src, dst)
    return Task(rng.choice(QUESTIONS["convert_units"]).format(**names), "convert_units",
                {"value": value, "from_unit": src, "to_unit": dst},
                f"The user wants {names['value']} {src} in {dst}. I will call convert_units.",
                result, result.split()[0], f"{names['value']} {names['src']} is about {result.split()[0]} {names['dst']}.")


def capital_task(rng: random.Random) -> Task:
    """'What is the capital of X?' answered through lookup_capital."""
    country = rng.choice(sorted(CAPITALS))
    return Task(rng.choice(QUESTIONS["lookup_capital"]).format(country=country), "lookup_capital",
                {"country": country}, f"The user asks for the capital of {country}. I will look it up.",
                CAPITALS[country], CAPITALS[country], f"The capital of {country} is {CAPITALS[country]}.")


def echo_item(rng: random.Random) -> str:
    """One item of an echo drill: a number as the tasks write them, or a unit, country, city or operator."""
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(0, 9999))
    if kind < 0.65:
        return format_number(rng.randint(10, 50000) / 10)
    return rng.choice(ECHO_WORDS)


def echo_drill(rng: random.Random) -> str:
    """A copy drill in the chat format: the user gives random items, the assistant repeats them verbatim.

    The tasks' arguments and answers are all copied from earlier in the conversation; these drills give
    that skill a dense training signal (every answer token is a copy), which the tool chats alone do not.
    """
    text = " ".join(echo_item(rng) for _ in range(rng.randint(3, 16)))
    tools = TOOLS if rng.random() < 0.1 else None
    asked = prompt([{"role": "user", "content": rng.choice(ECHO_REQUESTS).format(text=text)}], tools)
    return f"{asked}{chat.THINK_BEGIN}The user wants the text repeated exactly.{chat.THINK_END}{text}{chat.IM_END}"


# ---------------------------------------------------------------- tools drawn at random per conversation
#
# Names, parameter names, types, counts and descriptions are drawn per conversation, and the right tool sits at a
# random place among 1-3 declared ones, so the model must read the declaration. No tool name, parameter name or
# description here is one of benchmarks/tool_calls.py's held-out ones (tests/tools/test_make_corpus.py checks).

ARITHMETIC_NAMES = {"*": ["mult_ints", "multiplication", "do_mult", "int_mult", "mult_pair", "scale_int"],
                    "+": ["accumulate", "int_total", "total_pair", "combine_ints", "increase_by", "grand_total"],
                    "-": ["deduct", "int_diff", "diff_pair", "reduce_by", "decrease", "subtraction"]}
ARITHMETIC_DESCRIPTIONS = ["Gives {p} {op} {q}.", "{P} {word} {q}, for integers.", "Integer arithmetic: {p} {op} {q}.",
                           "Computes {p} {word} {q} exactly.", "Returns the integer {p} {op} {q}.",
                           "Calculates {p} {op} {q}.", "Yields {p} {word} {q}.",
                           "Works out {p} {word} {q} for two whole numbers.", "The integer {p} {word} {q}."]
OPERAND_PAIRS = [("p", "q"), ("u", "v"), ("i", "j"), ("lhs", "rhs"), ("num1", "num2"), ("alpha", "beta"),
                 ("val1", "val2"), ("term1", "term2"), ("c", "d"), ("s", "t"), ("k", "w")]
CAPITAL_NAMES = ["capital_lookup", "which_capital", "capital_for", "national_capital", "main_city", "capital_search"]
CAPITAL_PARAMS = ["state", "land", "territory", "region", "c", "homeland", "realm"]
CAPITAL_VERBS = ["Return", "Find", "Give", "Get", "Fetch", "Report", "Tell", "Name", "Show", "Retrieve"]
CAPITAL_OBJECTS = ["the capital of a country", "a country's capital city", "the capital city of the given country",
                   "which city is a nation's capital", "the seat of a country's government", "a nation's capital"]
CONVERT_NAMES = ["conversion", "transform_quantity", "recalc_units", "express_in", "switch_units", "rescale"]
CONVERT_PARAMS = [("number", "unit_in", "unit_out"), ("size", "origin", "goal"), ("how_much", "old", "new"),
                  ("magnitude", "from_u", "to_u"), ("val", "in_unit", "out_unit"), ("figure", "have", "want")]
CONVERT_VERBS = ["Re-express", "Change", "Turn", "Translate", "Express", "Rewrite", "Restate", "Map"]
CONVERT_OBJECTS = ["a value between units", "a measurement in another unit", "a quantity from one unit into another",
                   "an amount between measurement units", "a number given in one unit into another unit"]

VERBS = ["book", "send", "schedule", "track", "order", "rate", "search", "reserve", "create", "cancel", "check",
         "list", "update", "plan", "archive", "share", "print", "renew", "report", "rename"]
NOUNS = ["weather", "flight", "hotel", "message", "reminder", "package", "pizza", "ticket", "meeting", "playlist",
         "taxi", "recipe", "invoice", "alarm", "parcel", "table", "course", "movie", "loan", "shipment", "review",
         "garden", "backup", "lesson", "concert"]
CITIES = ["Lisbon", "Denver", "Osaka", "Quito", "Tallinn", "Accra", "Perth", "Bergen", "Porto", "Dakar", "Seville",
          "Krakow", "Hobart", "Lyon", "Zagreb", "Leeds", "Cusco", "Macau"]
PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Jonas", "Keiko", "Leila",
          "Marco", "Nadia", "Omar", "Priya"]
TEXT_WORDS = ["blue", "sunny", "quick", "report", "draft", "final", "spring", "budget", "team", "launch", "notes",
              "river", "maple", "silver", "orbit", "pixel", "harbor", "velvet"]
ENUMS = {"color": ["red", "green", "blue", "black", "white"], "size": ["small", "medium", "large"],
         "priority": ["low", "normal", "high", "urgent"], "mode": ["fast", "safe", "eco"],
         "format": ["pdf", "csv", "html", "txt"], "language": ["english", "french", "german", "spanish"],
         "seat": ["window", "aisle", "middle"], "tier": ["basic", "plus", "pro"]}
SLOT_NAMES = {"city": ["city", "town", "location", "destination", "venue"],
              "person": ["person", "recipient", "contact", "guest", "owner"],
              "integer": ["count", "limit", "days", "nights", "seats", "copies", "items", "level", "year", "floor"],
              "number": ["price", "weight", "budget", "rate", "temperature", "score", "distance", "height"],
              "boolean": ["urgent", "verbose", "public", "express", "notify", "dry_run", "recurring", "insured"],
              "text": ["title", "query", "note", "topic", "label", "subject", "comment"]}
YES_NO = {True: ["true", "yes", "on"], False: ["false", "no", "off"]}


@dataclasses.dataclass(frozen=True)
class ToolTask:
    """A conversation's last question, the tool (a full declaration) whose call answers it, and that call's outcome."""

    question: str
    tool: dict[str, Any]
    arguments: dict[str, Any]
    result: str
    answer: str

    @property
    def name(self) -> str:
        """The called tool's name."""
        return self.tool["function"]["name"]


TaskMaker = Callable[[random.Random], ToolTask]


def function_tool(rng: random.Random, name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style tool declaration whose parameters are all required, in the given order (closed or not)."""
    closed = {"additionalProperties": False} if rng.random() < 0.5 else {}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties), **closed}}}


def whole(x: float) -> float | int:
    """x as an int when it is whole, so that its JSON is written as the question writes it."""
    return int(x) if x == int(x) else x


def arithmetic_tool(rng: random.Random) -> tuple[dict[str, Any], TaskMaker]:
    """A random two-integer arithmetic tool under a new name, and a maker of tasks for it."""
    op = rng.choice(sorted(OPS))
    name = tool_name(rng, ARITHMETIC_NAMES[op])
    p, q = param_names(rng, OPERAND_PAIRS)
    word = OPS[op][0]
    description = rng.choice(ARITHMETIC_DESCRIPTIONS).format(p=p, P=p.capitalize(), q=q, op=op, word=word)
    tool = function_tool(rng, name, description, {p: {"type": "integer"}, q: {"type": "integer"}})

    def task(rng: random.Random) -> ToolTask:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        result = calculate(f"{a} {op} {b}")
        question = rng.choice(QUESTIONS["calculate"]).format(a=a, b=b, op=op, word=word)
        return ToolTask(question, tool, {p: a, q: b}, result, f"{a} {op} {b} = {result}.")

    return tool, task


def capital_tool(rng: random.Random) -> tuple[dict[str, Any], TaskMaker]:
    """A random capital-lookup tool under a new name and parameter."""
    name, (param,) = tool_name(rng, CAPITAL_NAMES), param_names(rng, [(p,) for p in CAPITAL_PARAMS])
    description = f"{rng.choice(CAPITAL_VERBS)} {rng.choice(CAPITAL_OBJECTS)}."
    tool = function_tool(rng, name, description, {param: {"type": "string"}})

    def task(rng: random.Random) -> ToolTask:
        country = rng.choice(sorted(CAPITALS))
        return ToolTask(rng.choice(QUESTIONS["lookup_capital"]).format(country=country), tool, {param: country},
                        CAPITALS[country], f"The capital of {country} is {CAPITALS[country]}.")

    return tool, task


def convert_tool(rng: random.Random) -> tuple[dict[str, Any], TaskMaker]:
    """A random unit-conversion tool under new names, its units free strings or an enum."""
    name, (value, src, dst) = tool_name(rng, CONVERT_NAMES), param_names(rng, CONVERT_PARAMS)
    units = sorted({u for pair in CONVERSIONS for u in pair})
    unit = {"type": "string", "enum": units} if rng.random() < 0.5 else {"type": "string"}
    description = f"{rng.choice(CONVERT_VERBS)} {rng.choice(CONVERT_OBJECTS)}."
    tool = function_tool(rng, name, description, {value: {"type": "number"}, src: unit, dst: unit})

    def task(rng: random.Random) -> ToolTask:
        base = conversion_task(rng)
        arguments = {value: whole(base.arguments["value"]), src: base.arguments["from_unit"],
                     dst: base.arguments["to_unit"]}
        return ToolTask(base.question, tool, arguments, base.result, base.answer)

    return tool, task


def made_up_word(rng: random.Random) -> str:
    """2-3 random syllables: a name new in nearly every conversation, which the model can only read, not recall."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice(["", "", "n", "r", "s"])
                   for _ in range(rng.randint(2, 3)))


def opaque_name(rng: random.Random) -> str:
    """A made-up tool name (two made-up words): its description alone tells what the tool does."""
    return f"{made_up_word(rng)}_{made_up_word(rng)}"


def tool_name(rng: random.Random, pool: list[str]) -> str:
    """Mostly a made-up name (opaque_name), else one from the family's pool of telling names: a name is copied from
    the tool list, not recalled."""
    return opaque_name(rng) if rng.random() < 0.7 else rng.choice(pool)


def param_names(rng: random.Random, pool: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Half the time distinct made-up parameter names, else a tuple from the family's pool: a value's place in the
    arguments then follows the schema's order, not a remembered name."""
    size = len(pool[0])
    while rng.random() < 0.5:
        names = tuple(made_up_word(rng) for _ in range(size))
        if len(set(names)) == size:
            return names
    return rng.choice(pool)


def slot_value(kind: str, param: str, rng: random.Random) -> tuple[dict[str, Any], Any, str]:
    """A parameter of `kind`: its JSON schema, a random value, and how a question states it."""
    if kind == "city":
        v = rng.choice(CITIES)
        return {"type": "string"}, v, rng.choice([f"in {v}", f"for {v}", f"{param} {v}"])
    if kind == "person":
        v = rng.choice(PEOPLE)
        return {"type": "string"}, v, rng.choice([f"for {v}", f"{param} {v}", f"with {v}"])
    if kind == "integer":
        v = rng.randint(1, 999)
        return {"type": "integer"}, v, rng.choice([f"{v} {param}", f"{param} {v}", f"{param} = {v}"])
    if kind == "number":
        v = whole(rng.randint(10, 99999) / 100) if rng.random() < 0.7 else rng.randint(1, 500)
        return {"type": "number"}, v, rng.choice([f"{param} {format_number(v)}", f"{param} = {format_number(v)}"])
    if kind == "boolean":
        v = rng.random() < 0.5
        return {"type": "boolean"}, v, rng.choice([f"{param} {rng.choice(YES_NO[v])}", f"{param} set to {str(v).lower()}"])
    if kind == "enum":
        v = rng.choice(ENUMS[param])
        return {"type": "string", "enum": ENUMS[param]}, v, rng.choice([f"{v} {param}", f"{param} {v}"])
    v = " ".join(rng.sample(TEXT_WORDS, rng.randint(1, 3)))
    return {"type": "string"}, v, rng.choice([f'{param} "{v}"', f"{param}: {v}"])


def action_tool(rng: random.Random) -> tuple[dict[str, Any], TaskMaker]:
    """A random verb_noun tool with 1-4 parameters of random kinds (string, integer, number, boolean, enum)."""
    verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
    name = tool_name(rng, [f"{verb}_{noun}"])
    kinds = rng.sample(sorted([*SLOT_NAMES, "enum"]), rng.randint(1, 4))
    params = [rng.choice(sorted(ENUMS) if kind == "enum" else SLOT_NAMES[kind]) for kind in kinds]
    schemas = {param: slot_value(kind, param, rng)[0] for kind, param in zip(kinds, params)}
    description = rng.choice([f"{verb.capitalize()} a {noun}.", f"{verb.capitalize()} the user's {noun}.",
                              f"Use this to {verb} a {noun}."])
    tool = function_tool(rng, name, description, schemas)

    def task(rng: random.Random) -> ToolTask:
        slots = [slot_value(kind, param, rng) for kind, param in zip(kinds, params)]
        order = rng.sample(range(len(slots)), len(slots))
        said = ", ".join(slots[i][2] for i in order)
        question = rng.choice([f"Please {verb} a {noun} {said}.", f"{verb.capitalize()} my {noun}: {said}.",
                               f"Can you {verb} the {noun} {said}?", f"I need to {verb} a {noun}, {said}."])
        number = rng.randint(100, 9999)
        return ToolTask(question, tool, {p: s[1] for p, s in zip(params, slots)}, json.dumps({"ok": True, "id": number}),
                        f"Done: the {noun} request went through (id {number}).")

    return tool, task


TOOL_FAMILIES = (arithmetic_tool, capital_tool, convert_tool, action_tool)
TOOL_FAMILY_WEIGHTS = (2, 1, 1, 3)


def random_toolset(rng: random.Random) -> tuple[list[dict[str, Any]], list[TaskMaker]]:
    """1-3 tools of distinct names drawn at random, and a task maker for each, in declaration order."""
    while True:
        made = [rng.choices(TOOL_FAMILIES, TOOL_FAMILY_WEIGHTS)[0](rng) for _ in range(rng.randint(1, 3))]
        if len({tool["function"]["name"] for tool, _ in made}) == len(made):
            return [tool for tool, _ in made], [maker for _, maker in made]


def solved_turns(task: ToolTask, index: int, reasoning: str) -> list[dict[str, Any]]:
    """The user's question, the assistant's call (K2 id with `index`), and the tool's result."""
    call = {"id": chat.call_id(task.name, index), "type": "function",
            "function": {"name": task.name, "arguments": json.dumps(task.arguments)}}
    return [{"role": "user", "content": task.question},
            {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": task.result}]


def plan_for(task: ToolTask) -> str:
    """The reasoning before a call: the declared tool's description and name, quoted as the tool list renders them
    (keys sorted: `"description": ..., "name": ...`), then its name once more. Quoted so, the name follows the same
    tokens in the reasoning as in the list, where the model can copy it from."""
    function = task.tool["function"]
    quoted = f'"description": {chat.tojson(function["description"])}, "name": {chat.tojson(task.name)}'
    return f"The tool for this: {quoted}. I will call {task.name}."


def random_tool_chat(rng: random.Random) -> str:
    """A training conversation with tools drawn at random: maybe an earlier solved question, then a question answered
    through one of the declared tools (or, one time in five, an echo request that needs none)."""
    tools, makers = random_toolset(rng)
    history: list[dict[str, Any]] = []
    if rng.random() < 0.35:
        earlier = rng.choice(makers)(rng)
        if rng.random() < 0.3:  # a result and answer that say nothing about the next question
            number = str(rng.randint(0, 999))
            earlier = dataclasses.replace(earlier, result=number, answer=f"The result is {number}.")
        history = [*solved_turns(earlier, 0, plan_for(earlier)), {"role": "assistant", "content": earlier.answer}]
    if rng.random() < 0.2:
        words = [*TEXT_WORDS, *CITIES, *PEOPLE]
        text = " ".join(echo_item(rng) if rng.random() < 0.4 else rng.choice(words) for _ in range(rng.randint(3, 10)))
        asked = prompt([*history, {"role": "user", "content": rng.choice(ECHO_REQUESTS).format(text=text)}], tools)
        return f"{asked}{chat.THINK_BEGIN}No tool is needed: the user wants the text repeated exactly.{chat.THINK_END}{text}{chat.IM_END}"
    task = rng.choice(makers)(rng)
    messages = [*history, *solved_turns(task, chat.call_count(history), plan_for(task))]
    reasoning = f"The {task.name} tool returned {task.result}, so I can answer."
    return prompt(messages, tools) + f"{chat.THINK_BEGIN}{reasoning}{chat.THINK_END}{task.answer}{chat.IM_END}"


TASK_MAKERS = (arithmetic_task, conversion_task, capital_task)


def make_task(rng: random.Random) -> Task:
    """A random task of a random kind."""
    return rng.choice(TASK_MAKERS)(rng)


def tool_call(task: Task) -> dict[str, Any]:
    """The OpenAI-style tool call that solves `task`."""
    return {"id": CALL_ID.format(name=task.tool), "type": "function",
            "function": {"name": task.tool, "arguments": json.dumps(task.arguments)}}


def call_messages(task: Task) -> list[dict[str, Any]]:
    """The conversation up to the model's first turn: the user's question."""
    return [{"role": "user", "content": task.question}]


def result_messages(task: Task, reasoning: str, call: dict[str, Any], result: str) -> list[dict[str, Any]]:
    """The conversation after the model reasoned, called `call` and got `result`."""
    return [*call_messages(task),
            {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result}]


def prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = TOOLS) -> str:
    """The K2 Thinking prompt for `messages` with `tools` declared, through the bundled chat template."""
    return chat.render(messages, tools, add_generation_prompt=True, template=chat.bundled_template())


def final_turn(task: Task) -> str:
    """The model's last turn after the tool result: reasoning, the answer, end of turn."""
    reasoning = f"The {task.tool} tool returned {task.result}, so I can answer."
    return f"{chat.THINK_BEGIN}{reasoning}{chat.THINK_END}{task.answer}{chat.IM_END}"


def conversation(task: Task) -> str:
    """A whole solved task as one training document in the exact K2 Thinking chat format."""
    return prompt(result_messages(task, task.plan, tool_call(task), task.result)) + final_turn(task)


def stdlib_files() -> list[Path]:
    """The standard library's own .py files (tests, site-packages and generated tables excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idle_test", "encodings", "pydoc_data", "__pycache__", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def read_source(path: Path, max_chars: int) -> str | None:
    """A source file's text, or None when it is not UTF-8 or longer than max_chars."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if 0 < len(text) <= max_chars else None


def is_heldout(name: str, seed: int, share: float) -> bool:
    """A stable held-out choice by hash of (seed, name)."""
    return zlib.crc32(f"{seed}:{name}".encode()) % 10_000 < share * 10_000


def code_documents(seed: int, budget_chars: int, heldout_share: float) -> tuple[list[str], list[str]]:
    """(train, held-out) stdlib sources, drawn in a seeded order until the training budget is spent."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    train, heldout, used = [], [], 0
    for path in files:
        text = read_source(path, max_chars=60_000)
        if text is None or used >= budget_chars:
            continue
        if is_heldout(path.name, seed, heldout_share):
            heldout.append(text)
        else:
            train.append(text)
            used += len(text)
    return train, heldout


def tasks(seed: int, n_train: int, n_heldout: int) -> tuple[list[Task], list[Task]]:
    """Training and held-out tasks; no held-out question occurs in training."""
    rng = random.Random(seed)
    train = [make_task(rng) for _ in range(n_train)]
    seen = {t.question for t in train}
    heldout_rng = random.Random(seed + 1_000_003)
    heldout: list[Task] = []
    while len(heldout) < n_heldout:
        task = make_task(heldout_rng)
        if task.question not in seen:
            heldout.append(task)
            seen.add(task.question)
    return train, heldout


@dataclasses.dataclass
class Corpus:
    """Documents of both splits and the held-out tasks that measure tool use."""

    train: list[str]
    heldout: list[str]
    heldout_tasks: list[Task]


def make_corpus(seed: int = 0, code_chars: int = CODE_CHARS, n_chats: int = DEFAULT_CHATS,
                n_heldout_chats: int = DEFAULT_HELDOUT_CHATS, heldout_share: float = HELDOUT_SHARE,
                n_echoes: int = DEFAULT_ECHOES, n_tool_chats: int = DEFAULT_TOOL_CHATS) -> Corpus:
    """The whole corpus: stdlib code, tool chats, and (training only) `n_echoes` echo drills and `n_tool_chats`
    conversations with tools drawn at random; each split shuffled."""
    code_train, code_heldout = code_documents(seed, code_chars, heldout_share)
    train_tasks, heldout_tasks = tasks(seed, n_chats, n_heldout_chats)
    echo_rng = random.Random(seed + 2_000_003)
    train = code_train + [conversation(t) for t in train_tasks] + [echo_drill(echo_rng) for _ in range(n_echoes)]
    tool_rng = random.Random(seed + 3_000_003)
    train += [random_tool_chat(tool_rng) for _ in range(n_tool_chats)]
    heldout = code_heldout + [conversation(t) for t in heldout_tasks]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return Corpus(train, heldout, heldout_tasks)


def write_jsonl(path: Path, rows: list[Any]) -> None:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def save(corpus: Corpus, out: Path) -> None:
    """train.jsonl, heldout.jsonl ({"text"} per line) and heldout_tasks.jsonl under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [{"text": t} for t in corpus.train])
    write_jsonl(out / "heldout.jsonl", [{"text": t} for t in corpus.heldout])
    write_jsonl(out / "heldout_tasks.jsonl", [dataclasses.asdict(t) for t in corpus.heldout_tasks])


def main() -> None:
    """CLI: build the corpus and write it as JSONL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bundled/corpus"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = make_corpus(args.seed)
    save(corpus, args.out)
    chars = sum(map(len, corpus.train))
    print(f"{len(corpus.train)} train docs ({chars / 1e6:.1f} M chars), {len(corpus.heldout)} held-out docs, "
          f"{len(corpus.heldout_tasks)} held-out tasks -> {args.out}")


if __name__ == "__main__":
    main()
