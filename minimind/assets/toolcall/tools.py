"""The mock tools of the tool-call eval (python -m minimind.evaluate --toolcall): deterministic stand-ins for a
calculator, a unit converter and two lookups, as MiniMind's own tool-call eval and agent RL have. Any chat can use
them too: python -m minimind.chat full_sft --tools minimind/assets/toolcall/tools.py
"""
import ast
import math
import operator

WEATHER = {"北京": (28, "晴"), "上海": (15, "多云"), "广州": (32, "闷热"), "深圳": (30, "晴"), "杭州": (22, "阴"),
           "成都": (18, "小雨"), "Tokyo": (12, "sunny"), "London": (5, "light rain"), "New York": (8, "cloudy"),
           "Paris": (10, "overcast")}
RATES = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
         ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83}
# unit: (dimension, size in the dimension's base unit); temperatures are converted apart
UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mile": ("length", 1609.344),
         "ft": ("length", 0.3048), "inch": ("length", 0.0254), "kg": ("mass", 1.0), "g": ("mass", 0.001),
         "lb": ("mass", 0.45359237), "celsius": ("temperature", None), "fahrenheit": ("temperature", None),
         "kelvin": ("temperature", None)}
ALIASES = {"meter": "m", "meters": "m", "米": "m", "kilometer": "km", "kilometers": "km", "公里": "km", "千米": "km",
           "centimeter": "cm", "厘米": "cm", "miles": "mile", "mi": "mile", "英里": "mile", "feet": "ft", "foot": "ft",
           "英尺": "ft", "inches": "inch", "in": "inch", "英寸": "inch", "kilogram": "kg", "kilograms": "kg",
           "公斤": "kg", "千克": "kg", "gram": "g", "grams": "g", "克": "g", "pound": "lb", "pounds": "lb",
           "lbs": "lb", "磅": "lb", "c": "celsius", "°c": "celsius", "摄氏度": "celsius", "f": "fahrenheit",
           "°f": "fahrenheit", "华氏度": "fahrenheit", "k": "kelvin", "开尔文": "kelvin"}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
             ast.UAdd: operator.pos}
FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round}


def _number(x: float):
    """An integer when it is one, else rounded to 6 decimals (what a calculator shows)."""
    return int(x) if float(x).is_integer() and abs(x) < 1e15 else round(x, 6)


def _evaluate(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
            and not node.keywords:
        return FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args])
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculate(expression: str) -> dict:
    """Evaluate an arithmetic expression: + - * / // % ** (or ^), parentheses, sqrt(), abs(), round().

    Args:
        expression: the expression, e.g. 256 * 37 or sqrt(144)
    """
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace("（", "(").replace("）", ")")
    return {"result": _number(_evaluate(ast.parse(text, mode="eval").body))}


def _unit(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in UNITS:
        raise ValueError(f"unknown unit {name!r}")
    return key


def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a length, a mass or a temperature from one unit to another.

    Args:
        value: the number to convert
        from_unit: its unit: m, km, cm, mile, ft, inch, kg, g, lb, celsius, fahrenheit or kelvin
        to_unit: the unit wanted
    """
    a, b = _unit(from_unit), _unit(to_unit)
    (dim_a, size_a), (dim_b, size_b) = UNITS[a], UNITS[b]
    if dim_a != dim_b:
        raise ValueError(f"cannot convert {dim_a} ({a}) to {dim_b} ({b})")
    if dim_a == "temperature":
        kelvin = {"celsius": value + 273.15, "fahrenheit": (value - 32) * 5 / 9 + 273.15, "kelvin": value}[a]
        result = {"celsius": kelvin - 273.15, "fahrenheit": (kelvin - 273.15) * 9 / 5 + 32, "kelvin": kelvin}[b]
    else:
        result = value * size_a / size_b
    return {"result": _number(round(result, 2)), "unit": b}


def get_weather(city: str) -> dict:
    """The current weather of a city.

    Args:
        city: the city's name, e.g. 北京 or London
    """
    if city not in WEATHER:
        raise ValueError(f"no weather for {city!r}")
    temperature, condition = WEATHER[city]
    return {"city": city, "temperature_celsius": temperature, "condition": condition}


def get_exchange_rate(from_currency: str, to_currency: str) -> dict:
    """The exchange rate between two currencies: how many units of to_currency one from_currency buys.

    Args:
        from_currency: a currency code, e.g. USD
        to_currency: a currency code, e.g. CNY
    """
    pair = (from_currency.strip().upper(), to_currency.strip().upper())
    if pair in RATES:
        rate = RATES[pair]
    elif pair[::-1] in RATES:
        rate = round(1 / RATES[pair[::-1]], 4)
    else:
        raise ValueError(f"no rate for {pair[0]} to {pair[1]}")
    return {"from": pair[0], "to": pair[1], "rate": rate}
