"""The source rewriter of cudasim: turns a .cu file into C++ that a host compiler builds against cudasim.h.

It does only what the host compiler cannot, and leaves every kernel, launcher and shared header untouched:

* ``K<<<grid, block[, smem[, stream]]>>>(args);`` -> ``::cudasim::launch("K", "file:line", K, grid, block, smem,
  stream, args);`` (the kernel runs on cudasim's block scheduler);
* ``extern __shared__ T name[];`` -> ``T* name = ::cudasim::dynamic_shared<T>();`` and ``__shared__ T name[N];`` ->
  ``auto& name = ::cudasim::static_shared<T[N]>("file:line:name");`` (per-block shared memory);
* the ``TORCH_LIBRARY_IMPL(tscd, CUDA, m)`` block -> ``TORCH_LIBRARY_FRAGMENT(tscd_cudasim, m)`` with ``m.impl`` ->
  ``m.def`` (schemas inferred), so the CUDA entry points become ops ``torch.ops.tscd_cudasim.<name>`` on CPU tensors,
  beside (not instead of) the real CPU ops;
* ``TSCD_CHECK_CUDA`` -> ``TSCD_CHECK_CPU`` (the tensors live on the CPU).

Line numbers are kept (a ``#line`` directive names the original file), so compiler messages, ``__FILE__`` and
``__LINE__`` (the barrier names in divergence reports) point into the .cu file.
"""
from __future__ import annotations

import re
from pathlib import Path

NAMESPACE = "tscd_cudasim"


class RewriteError(ValueError):
    """The .cu source holds a construct the rewriter does not know; the message names file and line."""


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_literal(text: str, i: int) -> int:
    """Index after the string or char literal starting at text[i]."""
    quote = text[i]
    i += 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _match_close(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing the one at text[i] (literals and nested brackets skipped)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_literal(text, i)
            continue
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise RewriteError(f"unbalanced {open_ch!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_literal(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (just before ``<<<``): an id-expression, possibly
    qualified (``ns::k``) and with template arguments (``k<scalar_t, true>``)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    while i > 0:
        c = text[i - 1]
        if c == ">":  # template arguments: back to the matching '<'
            depth, j = 0, i - 1
            while j >= 0:
                if text[j] == ">":
                    depth += 1
                elif text[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            i = j
        elif c.isalnum() or c == "_":
            i -= 1
        elif c == ":" and i >= 2 and text[i - 2] == ":":
            i -= 2
        else:
            break
    return i


def _rewrite_launches(text: str, path: str) -> str:
    out, pos = [], 0
    while True:
        at = text.find("<<<", pos)
        if at < 0:
            out.append(text[pos:])
            return "".join(out)
        line = _line_of(text, at)
        start = _kernel_start(text, at)
        kernel = text[start:at].strip()
        if not kernel:
            raise RewriteError(f"{path}:{line}: a launch '<<<' without a kernel name")
        close = text.find(">>>", at + 3)
        if close < 0:
            raise RewriteError(f"{path}:{line}: '<<<' without '>>>'")
        config = _split_top(text[at + 3:close])
        if not 2 <= len(config) <= 4:
            raise RewriteError(f"{path}:{line}: a launch takes 2 to 4 configuration values; got {len(config)}")
        grid, block = config[0], config[1]
        smem = config[2] if len(config) > 2 else "0"
        stream = config[3] if len(config) > 3 else "nullptr"
        paren = close + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if paren >= len(text) or text[paren] != "(":
            raise RewriteError(f"{path}:{line}: a launch must be followed by its argument list")
        args_end = _match_close(text, paren, "(", ")")
        args = text[paren + 1:args_end]
        name = " ".join(kernel.split())
        lead = ", " if args.strip() else ""
        # keep the newlines of the original so that later line numbers do not move
        newlines = text.count("\n", start, paren + 1)
        call = (f'::cudasim::launch("{name}", "{Path(path).name}:{line}", {kernel}, {grid}, {block}, {smem}, '
                f"{stream}{lead}")
        out.append(text[pos:start])
        out.append(call + "\n" * newlines + args + ")")
        pos = args_end + 1


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?(?P<type>[\w:<>\s*]+?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(
    r"__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?(?P<type>[\w:<>\s*]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);")


def _rewrite_shared(text: str, path: str) -> str:
    text = _EXTERN_SHARED.sub(lambda m: f"{m['type']}* {m['name']} = ::cudasim::dynamic_shared<{m['type']}>();", text)

    def static(m: re.Match) -> str:
        dims = "".join(m["dims"].split())
        key = f"{Path(path).name}:{_line_of(text, m.start())}:{m['name']}"
        return f'auto& {m["name"]} = ::cudasim::static_shared<{m["type"]}{dims}>("{key}");'

    text = _STATIC_SHARED.sub(static, text)
    left = re.search(r"\b__shared__\b", text)
    if left:
        raise RewriteError(f"{path}:{_line_of(text, left.start())}: a __shared__ declaration the rewriter does not "
                           f"know (supported: 'extern __shared__ T name[];' and '__shared__ T name[N]...;')")
    return text


_REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*tscd\s*,\s*CUDA\s*,\s*(?P<var>\w+)\s*\)\s*\{")


def _rewrite_registration(text: str, path: str) -> str:
    out, pos, found = [], 0, False
    for m in _REGISTRATION.finditer(text):
        found = True
        brace = m.end() - 1
        end = _match_close(text, brace, "{", "}")
        body = re.sub(rf"\b{m['var']}\s*\.\s*impl\s*\(", f"{m['var']}.def(", text[brace:end + 1])
        out += [text[pos:m.start()], f"TORCH_LIBRARY_FRAGMENT({NAMESPACE}, {m['var']}) ", body]
        pos = end + 1
    out.append(text[pos:])
    text = "".join(out)
    if "TORCH_LIBRARY_IMPL" in text:
        raise RewriteError(f"{path}: a TORCH_LIBRARY_IMPL block other than (tscd, CUDA, m)")
    if not found:
        raise RewriteError(f"{path}: no TORCH_LIBRARY_IMPL(tscd, CUDA, m) block: the kernels would not be reachable")
    return text


def rewrite(text: str, path: str) -> str:
    """The host-compilable C++ for the CUDA source ``text`` (read from ``path``)."""
    body = _rewrite_launches(text, path)
    body = _rewrite_shared(body, path)
    body = _rewrite_registration(body, path)
    body = re.sub(r"\bTSCD_CHECK_CUDA\b", "TSCD_CHECK_CPU", body)
    if "<<<" in body or ">>>" in body:
        raise RewriteError(f"{path}: a launch was left unrewritten")
    return f'#line 1 "{path}"\n' + body


def rewrite_file(src: Path, dst: Path, name: str | None = None) -> None:
    """Rewrites ``src`` into ``dst``; ``name`` is the path compiler messages and ``__FILE__`` give (default: src)."""
    dst.write_text(rewrite(src.read_text(), name or str(src)))
