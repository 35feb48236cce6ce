"""The options several commands share, each defined once: one flag, one `dest`, one help text.

`add(parser, "model", "device", ...)` puts them on a parser. The lab's options (--model, --device,
--dtype, --data-dir, --trust-remote-code) are on the top-level parser too, so both
`frankenlab --model X run r.toml` and `frankenlab run r.toml --model X` set `args.model` (given in
both places, the one after the subcommand wins). On a subcommand they default to argparse.SUPPRESS:
argparse copies every attribute a subcommand's parser sets over the top-level ones, so a subcommand
default would silently undo a top-level value.

What leaving an option out means differs by command (eval opens the bundled model, run keeps the
recipe's); a command says so in `notes`, e.g. `add(p, "model", notes={"model": "default: the
recipe's model"})`; the help text is the shared sentence plus that note.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

BUNDLED_MODEL = "default: the bundled SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Option:
    flag: str
    dest: str
    help: str
    note: str = ""  # what leaving it out means, unless a command says otherwise
    lab: bool = False  # also on the top-level parser (the lab's option): SUPPRESS on subcommands
    default: Any = None
    kwargs: dict = field(default_factory=dict)

    def help_text(self, note: str | None) -> str:
        note = self.note if note is None else note
        return f"{self.help} ({note})" if note else self.help


OPTIONS: dict[str, Option] = {
    o.dest: o
    for o in (
        Option(
            "--model",
            "model",
            "model source: an HF folder, a .gguf file, a hub id (org/name), or a GPTQ, gptq or eora stage folder",
            BUNDLED_MODEL,
            lab=True,
            kwargs={"metavar": "MODEL"},
        ),
        Option("--device", "device", "auto, cpu or cuda[:N]", "default: auto", lab=True, default="auto"),
        Option(
            "--dtype",
            "dtype",
            "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16",
            "default: auto",
            lab=True,
            default="auto",
        ),
        Option(
            "--data-dir",
            "data_dir",
            "evaluation/calibration data folder",
            "default: $FRANKENLAB_DATA_DIR",
            lab=True,
            kwargs={"metavar": "DIR"},
        ),
        Option(
            "--trust-remote-code",
            "trust_remote_code",
            "allow model code from the hub",
            "off by default",
            lab=True,
            default=False,
            kwargs={"action": "store_true"},
        ),
        Option("--out", "out", "output folder", kwargs={"metavar": "DIR"}),
        Option(
            "--no-save-models",
            "no_save_models",
            "do not save each stage's model",
            default=False,
            kwargs={"action": "store_true"},
        ),
        Option("--format", "fmt", "output format"),
    )
}
BY_FLAG = {o.flag: o for o in OPTIONS.values()}
LAB_OPTIONS = tuple(name for name, o in OPTIONS.items() if o.lab)


def add(
    parser: argparse.ArgumentParser,
    *names: str,
    top: bool = False,
    notes: dict[str, str] | None = None,
    **extra: dict[str, Any],
) -> None:
    """Add the shared options `names` (their dests: "model", "data_dir", ...) to `parser`. `top`: the
    top-level parser (real defaults). `notes`: per option, what leaving it out means here. `extra`:
    per option, argparse keywords only this command needs (`out={"required": True}`,
    `fmt={"choices": (...)}`); never a dest or a help text."""
    notes = notes or {}
    stray = (set(notes) | set(extra)) - set(names)
    if stray:
        raise ValueError(f"notes or keywords for options not added: {sorted(stray)}")
    for name in names:
        o = OPTIONS[name]
        kw = {**o.kwargs, **extra.get(name, {})}
        if "dest" in kw or "help" in kw:
            raise ValueError(f"{o.flag}: dest and help are the shared ones")
        default = argparse.SUPPRESS if o.lab and not top else o.default
        action = parser.add_argument(o.flag, dest=o.dest, default=default, help=o.help_text(notes.get(name)), **kw)
        action.shared = o  # the definition it came from (tests walk the parsers for it)
