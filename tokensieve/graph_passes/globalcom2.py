"""GlobalCom²'s graph face: the decoder graphs are unchanged.

The method's only graph change is the vision graph's extra output ``cls_scores [P, n]``, which the converter exports
because the method declares ``cls_scores`` (:class:`tokensieve.methods.globalcom2.GlobalCom2`); the host selects the
image tokens from it (:mod:`tokensieve.runtimes.globalcom2`) and prefill runs on the shorter prompt.
"""

from __future__ import annotations

from typing import Any

from tokensieve.methods.faces import register
from tokensieve.methods.globalcom2 import GlobalCom2


@register("export", GlobalCom2)
def rewrite(graphs: dict[str, Any], method: GlobalCom2) -> dict[str, Any]:
    return graphs
