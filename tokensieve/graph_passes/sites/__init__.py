"""Site emitters: the graph face of each method, called by :class:`TokenReductionPass` at each of its sites.

An emitter receives the located block and the token state entering the site (:class:`common.SiteInput`), builds
its nodes with a :class:`NodeBuilder` and returns the new stream and sizes (:class:`common.SiteOutput`). It names
the index tensors that define its selection (``b.expose``) so parity can compare them with the eager reference.
"""

from __future__ import annotations
