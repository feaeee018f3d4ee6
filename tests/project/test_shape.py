"""The code's shape, measured from its syntax tree: no long functions, no long signatures.

Per package (``LIMITS``; add a row to hold another package to the same or its own limits):

- a function is at most ``lines`` long (from ``def`` to its end, its docstring not counted);
  Triton kernels (``@triton.jit`` and the like) are exempt, their length is the kernel's;
- a private signature (a name with a leading ``_``, a method of a private class, a function
  defined inside another) takes at most ``private_params`` parameters;
- a public one at most ``public_params``, unless it is a keyword facade: its parameters past
  that count are keyword-only and its body (docstring aside) is at most ``facade_lines`` long,
  with no loop, and builds typed options (calls a ``...Options`` class or its ``build``).

``self`` and ``cls`` are not counted; ``*args`` and ``**kwargs`` count one each.

    python tests/project/test_shape.py [package ...]    # every function over half a limit, measured
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Limits:
    lines: int = 80
    private_params: int = 10
    public_params: int = 14
    facade_lines: int = 30


# issue 24 held gft_kernels to these limits, issue 25 the trainer, the study and the benchmarks
LIMITS = {"gft_kernels": Limits(), "gft_train": Limits(), "study": Limits(), "benchmarks": Limits()}

_KERNEL_DECORATORS = ("triton.", "tl.", "jit", "libdevice.")


@dataclass(frozen=True)
class Function:
    where: str  # path:line
    name: str  # qualified: Class.method, outer.<locals>.inner
    lines: int  # def to end, docstring not counted
    body_lines: int  # the body, docstring not counted
    params: int
    public: bool
    facade: bool
    kernel: bool


def _docstring_lines(node) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def _params(args: ast.arguments) -> list[str]:
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return names


def _builds_options(node) -> bool:
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        name = ast.unparse(call.func)
        if name.endswith("Options") or (name.endswith(".build") and "Options" in name):
            return True
    return False


def _is_facade(node, limits: Limits) -> bool:
    args = node.args
    bound = 1 if args.args and args.args[0].arg in ("self", "cls") else 0
    positional = len(args.posonlyargs) + len(args.args) - bound
    body = node.body[1:] if _docstring_lines(node) else node.body
    body_lines = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
    no_loop = not any(isinstance(n, (ast.For, ast.While, ast.AsyncFor)) for b in body for n in ast.walk(b))
    short = body_lines <= limits.facade_lines and no_loop
    return positional <= limits.public_params and short and _builds_options(node)


def functions(source: str, path: str = "<source>", limits: Limits = Limits()) -> list[Function]:  # noqa: B008 (frozen)
    """Every function and method of a module's source, measured."""
    found = []

    def visit(node, scope: str, private: bool, in_class: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{scope}{child.name}.", private or child.name.startswith("_"), True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = _params(child.args)
                if in_class and names and names[0] in ("self", "cls"):
                    names = names[1:]
                doc = _docstring_lines(child)
                body = child.body[1:] if doc else child.body
                is_private = private or (child.name.startswith("_") and not child.name.startswith("__"))
                decorators = [ast.unparse(d) for d in child.decorator_list]
                found.append(
                    Function(
                        where=f"{path}:{child.lineno}",
                        name=scope + child.name,
                        lines=child.end_lineno - child.lineno + 1 - doc,
                        body_lines=(body[-1].end_lineno - body[0].lineno + 1) if body else 0,
                        params=len(names),
                        public=not is_private,
                        facade=_is_facade(child, limits),
                        kernel=any(d.startswith(_KERNEL_DECORATORS) for d in decorators),
                    )
                )
                visit(child, f"{scope}{child.name}.<locals>.", True, False)
            else:
                visit(child, scope, private, in_class)

    visit(ast.parse(source), "", False, False)
    return found


def violations(fns: list[Function], limits: Limits) -> list[str]:
    out = []
    for f in fns:
        if f.kernel:
            continue
        if f.lines > limits.lines:
            out.append(f"{f.where} {f.name}: {f.lines} lines (limit {limits.lines})")
        if not f.public and f.params > limits.private_params:
            out.append(f"{f.where} {f.name}: {f.params} parameters, private (limit {limits.private_params})")
        if f.public and f.params > limits.public_params and not f.facade:
            out.append(
                f"{f.where} {f.name}: {f.params} parameters, public and not a keyword facade of at most "
                f"{limits.facade_lines} lines that builds typed options (limit {limits.public_params})"
            )
    return out


def package_functions(package: str) -> list[Function]:
    limits = LIMITS.get(package, Limits())
    return [
        f
        for path in sorted((ROOT / package).rglob("*.py"))
        for f in functions(path.read_text(), str(path.relative_to(ROOT)), limits)
    ]


def test_every_package_in_the_table_keeps_its_shape():
    problems = [v for package, limits in LIMITS.items() for v in violations(package_functions(package), limits)]
    assert not problems, "\n".join(problems)


def test_the_measure_sees_long_functions_long_signatures_and_facades():
    """The measure itself, on source written to break each rule once (and to keep it once)."""
    limits = Limits(lines=5, private_params=3, public_params=4, facade_lines=3)
    source = '''
def long_one(a):
    """A docstring
    of three lines does not count."""
    x = 1
    x = 2
    x = 3
    x = 4
    return x

def _many(a, b, c, d):
    return a

def public_many(a, b, c, d, *, e, f):
    for _ in a:
        pass

def facade(a, b, *, c=1, d=2, e=3):
    """Builds its options only."""
    options = RunOptions.build(c, d, e)
    return _run(a, b, options)

class Module:
    def __init__(self, a, b, c, d, *, e=0):
        self.options = LossOptions(a, b, c, d, e)

    def method(self, a, b, c):
        def inner(x, y, z, w):
            return x
        return inner

@triton.jit
def kernel(a, b, c, d, e, f, g, h):
    pass
'''
    fns = {f.name: f for f in functions(source, limits=limits)}
    assert fns["long_one"].lines == 6 and fns["_many"].params == 4 and not fns["_many"].public
    assert fns["facade"].facade and not fns["public_many"].facade and fns["Module.__init__"].facade
    assert fns["Module.method"].params == 3 and not fns["Module.method.<locals>.inner"].public
    assert fns["kernel"].kernel
    found = violations(list(fns.values()), limits)
    named = sorted(v.split(" ")[1].rstrip(":") for v in found)
    assert named == ["Module.method.<locals>.inner", "_many", "long_one", "public_many"], found


if __name__ == "__main__":
    for package in sys.argv[1:] or list(LIMITS):
        limits = LIMITS.get(package, Limits())
        fns = package_functions(package)
        for f in sorted(fns, key=lambda f: -f.lines):
            if f.lines > limits.lines // 2 or f.params > limits.private_params // 2:
                print(
                    f"{f.where:48s} {f.name:45s} lines {f.lines:4d} params {f.params:3d}"
                    f"{' public' if f.public else ''}{' facade' if f.facade else ''}{' kernel' if f.kernel else ''}"
                )
        for v in violations(fns, limits):
            print("OVER:", v)
