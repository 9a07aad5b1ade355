"""The cluster's /metrics (docs/cluster.md, "Visibility"): the nodes' Prometheus expositions as one, each sample
with a `node` label naming the node it came from (pure).

The text format wants every line of a metric family in one group, its HELP and TYPE first and once, so the
nodes' texts are not concatenated: each is cut into its families (prometheus_client writes HELP and TYPE before
each family's samples, a histogram's `_bucket`, `_sum` and `_count` among them), and each family is written once,
with the samples of every node under it, in the order the families first appear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_MODEL = re.compile(r'[{,]model="((?:[^"\\]|\\.)*)"')


def _labelled(sample: str, node: str) -> str:
    """A sample line with `node="..."` as its first label."""
    value = node.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    name, rest = sample[:cut], sample[cut:]
    if rest.startswith("{}"):
        return f'{name}{{node="{value}"}}{rest[2:]}'
    if rest.startswith("{"):
        return f'{name}{{node="{value}",{rest[1:]}'
    return f'{name}{{node="{value}"}}{rest}'


def merged(texts: Mapping[str, str], visible: Callable[[str], bool] | None = None) -> str:
    """One exposition from each node's (`node -> text`); with `visible`, only the samples of the models it
    allows among those with a `model` label (a key limited to some models sees only their series, as on one
    node)."""
    heads: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines, from the first node that has them
    samples: dict[str, list[str]] = {}  # family -> every node's samples, labelled
    for node, text in texts.items():
        family, keep = "", False
        seen: set[str] = set()  # the families this node has started: only the first node's heads are kept
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                if family not in seen:
                    seen.add(family)
                    if family not in heads:
                        heads[family] = []
                        samples[family] = []
                        keep = True
                    else:
                        keep = False
                if keep:
                    heads[family].append(line)
                continue
            if line.startswith("#"):
                continue  # a comment belongs to no sample
            samples.setdefault(family, [])
            heads.setdefault(family, [])
            model = _MODEL.search(line[:line.rfind("}") + 1] if "{" in line else "")  # in its labels only
            if visible is None or model is None or visible(model.group(1)):
                samples[family].append(_labelled(line, node))
    lines: list[str] = []
    for family, head in heads.items():
        lines += head + samples[family]
    return "\n".join(lines) + "\n" if lines else ""
