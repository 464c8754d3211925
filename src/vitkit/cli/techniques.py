"""``vitkit techniques``: every registered technique, from its one registration (vitkit.registry)."""

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.progress import console


@app.command(rich_help_panel="Inspect")
def techniques(
    name: str | None = Arg(None, help="one technique: its options with types, defaults and descriptions"),
    markdown: bool = Opt(False, "--markdown", help="print the docs/techniques.md table instead"),
) -> None:
    """List the techniques a run's manifest can carry: what each does, its paper, export and options."""
    from rich.markup import escape
    from rich.table import Table

    from vitkit.registry import markdown_table, technique, techniques

    if markdown:
        print(markdown_table(), end="")
        return
    if name is not None:
        t = technique(name, what="no technique is called")
        console.print(f"[bold]{t.name}[/] ({t.family}): {escape(t.summary)}")
        console.print(f"paper: {escape(t.paper or '—')}; applied by: {escape(t.verb or '—')}")
        console.print(f"export: {escape(t.export.describe())}; quantize after it: "
                      f"{escape('refused: ' + t.quantize) if t.quantize else 'yes'}")  # fmt: skip
        if t.requires:
            console.print(f"requires before it: {', '.join(t.requires)}")
        table = Table(title=f"{t.name} options")
        for col in ("option", "type", "default", "description"):
            table.add_column(col)
        for field, kind, default, desc in t.config_fields():
            table.add_row(field, escape(kind), escape(repr(default)), escape(desc))
        console.print(table)
        return
    table = Table(title="registered techniques (vitkit techniques NAME for options)")
    for col in ("name", "family", "what it does", "export", "quantize"):
        table.add_column(col)
    for t in techniques():
        table.add_row(t.name, t.family, escape(t.summary), escape(t.export.describe()),
                      "refused" if t.quantize else "yes")  # fmt: skip
    console.print(table)
