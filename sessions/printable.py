"""Names as a terminal may print them: the one place control characters are taken out.

A session's or recipe's name comes from a file anyone may have written. Printed raw, an escape
sequence in it can retitle the window or clear the screen, and a newline or a tab splits a row of
piped output. `printable` drops ESC, BEL and every other C0/C1 control character and turns line
breaks and tabs into single spaces; the stored name is never changed, only what is shown. Used by
`frankenlab sessions`, `frankenlab compare` (every format), the CLI's run and replay tables and the
lab's session list.
"""

from __future__ import annotations

import re

_BREAKS = re.compile(r"[\t\n\r\v\f\x85\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """`text` as a string without control characters: line breaks and tabs become one space."""
    return _CONTROL.sub("", _BREAKS.sub(" ", str(text)))
