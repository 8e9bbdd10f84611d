"""Render a compiled :class:`~slipway.flows.compiler.Plan` as text by levels, Mermaid or Graphviz dot."""

from __future__ import annotations

from slipway.flows.compiler import Plan


def render(plan: Plan, fmt: str = "text") -> str:
    """The DAG of ``plan`` in ``fmt`` (``text``, ``mermaid`` or ``dot``), ending with a newline."""
    return {"text": _text, "mermaid": _mermaid, "dot": _dot}[fmt](plan)


def _text(plan: Plan) -> str:
    p = plan.pipeline
    lines = [f"pipeline {p.name}" + (f" (model {p.model})" if p.model else "") + f" — {len(plan.order)} steps"]
    if p.params:
        decl = ", ".join(f"{k}: {v.type}" + ("" if v.is_required else f" = {v.default!r}") for k, v in p.params.items())
        lines.append(f"params: {decl}")
    for i, level in enumerate(plan.levels):
        lines.append(f"level {i}:")
        for name in level:
            s = plan.steps[name]
            extra = []
            if s.needs:
                extra.append("needs " + ", ".join(s.needs))
            if s.spec.if_:
                extra.append(f"if {s.spec.if_}")
            if s.spec.retries:
                extra.append(f"retries {s.spec.retries}")
            if s.spec.timeout:
                extra.append(f"timeout {s.spec.timeout:g}s")
            lines.append(f"  {name} ({s.spec.uses})" + (f"  [{'; '.join(extra)}]" if extra else ""))
    return "\n".join(lines) + "\n"


def _mermaid(plan: Plan) -> str:
    ids = {n: f"s{i}" for i, n in enumerate(plan.order)}
    lines = ["flowchart TD"]
    for n in plan.order:
        label = f"{n}<br/><i>{plan.steps[n].spec.uses}</i>".replace('"', "'")
        lines.append(f'  {ids[n]}["{label}"]')
    for n in plan.order:
        for d in plan.steps[n].needs:
            edge = " -->|if| " if plan.steps[n].spec.if_ else " --> "
            lines.append(f"  {ids[d]}{edge}{ids[n]}")
    return "\n".join(lines) + "\n"


def _dot(plan: Plan) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(plan.pipeline.name)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for n in plan.order:
        label = q(n)[:-1] + "\\n" + q(plan.steps[n].spec.uses)[1:]
        lines.append(f"  {q(n)} [label={label}];")
    for n in plan.order:
        for d in plan.steps[n].needs:
            style = ' [style=dashed, label="if"]' if plan.steps[n].spec.if_ else ""
            lines.append(f"  {q(d)} -> {q(n)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"
