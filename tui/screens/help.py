"""The help screen: what each pane does and every key."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# frankenlab

Compress a small LLaMA model and see what each step costs and buys.
Switch panes with **1-8**, **ctrl+pagedown**/**ctrl+pageup** (next/previous, also while typing) or a click on the tabs; **esc** leaves a text field; **ctrl+p** opens the command palette with every action.

| pane | what it does |
|---|---|
| 1 Layers | the model, and every decoder layer as a cell: **space**/click keep or skip, **+**/**-** repeat, **0** reset, **u** use the plan as the recipe's depth stage, **e** estimate the plan's perplexity again, **i** importance scan (heat colours); a cell's number is that layer's change alone (skipped, or repeated as shown) against the unmodified model, the whole plan's is on the what-if line beside the plan |
| 2 Recipe | depth (k, metric, or the grid's plan), width **N:M = prunes N of every M**, LoRA, GPTQ, EoRA, evaluation, calibration; a refused value says why under the field |
| 3 Run | per-stage progress and the log; **ctrl+r** runs, **ctrl+x** or **ctrl+c** cancels after the current batch (finished stages are kept) |
| 4 Results | stages with perplexity (and its protocol), TriviaQA, parameters, footprint, seconds; perplexity and LoRA loss plots; memory bars against a hardware target |
| 5 Chat | chat with the baseline, the grid's plan or any finished stage; A/B: both models answer the same conversation, one after the other; **esc** leaves the prompt, **esc** again stops a reply |
| 6 Sessions | saved runs: open, compare several, replay; **ctrl+s** save the session as, **ctrl+o** open a session file |
| 7 Sweep | a sweep file (a grid of configurations sharing prefixes): Check, Launch in the background, Stop; rows fill as configurations finish, the Pareto front redraws; **enter** on a row opens its session |
| 8 Plan | the best per-layer plan (skip, N:M, bits) within a weight budget: type `60MiB`, `45%` or a target name and press **enter**; the first plan measures each layer's sensitivities (cached), **esc** or **ctrl+x** cancels; shows the verdict, the plan per layer, the predicted front and the heat map; **u** puts the plan into the recipe form |

| key | action |
|---|---|
| ctrl+r | run the recipe |
| ctrl+x or ctrl+c | cancel the run (ctrl+c again asks to quit) |
| ctrl+s / ctrl+o | save / open a session |
| ctrl+l / ctrl+w | load / write a recipe TOML |
| ctrl+t | dark / light theme |
| f1 or ? | this help |
| ctrl+pagedown / ctrl+pageup | next / previous pane |
| esc | leave a text field |
| ctrl+q | quit (asks first while a run or sweep goes) |

Perplexity is always printed with its protocol: `wikitext2-rows-512` is the thesis protocol (each row
on its own), `wikitext2-concat-512` the GPTQ/WANDA one (rows joined, non-overlapping windows);
`:first32` means only the first 32 rows or windows were scored.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,f1,question_mark", "dismiss", "Close help")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP)
