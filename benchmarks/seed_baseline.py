"""A straightforward implementation of the seed paper's data-free alignment (Zhang et al. 2025, weight matching with
FFN permutations and per-head QK/VO rotations plus rescaling), for BERT checkpoints: the baseline of
``benchmarks/align_speed.py``'s end-to-end comparison. Plain loops, scipy's LAP, one SVD per head, numpy quartic roots;
loads whole state dicts, writes one safetensors file. It is a timing baseline, not part of symmerge.

    python benchmarks/seed_baseline.py REFERENCE_DIR MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment


def best_scale(x1, x2, y1, y2) -> float:
    """argmin_a ‖a X1 − X2‖² + ‖Y1/a − Y2‖² over the real positive roots of the quartic."""
    c = [float((x1 * x1).sum()), -float((x1 * x2).sum()), 0.0, float((y1 * y2).sum()), -float((y1 * y1).sum())]
    roots = [r.real for r in np.roots(c) if abs(r.imag) < 1e-9 and r.real > 0]
    cost = lambda a: float(((a * x1 - x2) ** 2).sum() + ((y1 / a - y2) ** 2).sum())  # noqa: E731
    return min(roots or [1.0], key=cost)


def main(ref_dir: str, model_dir: str, out_dir: str) -> None:
    ref, model = load_file(Path(ref_dir) / "model.safetensors"), load_file(Path(model_dir) / "model.safetensors")
    config = json.loads((Path(ref_dir) / "config.json").read_text())
    heads, d = config["num_attention_heads"], config["hidden_size"]
    dh = d // heads
    out = dict(model)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        w1, b1, w2 = (ref[p + k] for k in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight"))
        v1, c1, v2 = (model[p + k] for k in ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight"))
        s = w1 @ v1.T + torch.outer(b1, c1) + w2.T @ v2
        _, perm = linear_sum_assignment(s.numpy(), maximize=True)
        perm = torch.from_numpy(perm)
        out[p + "intermediate.dense.weight"], out[p + "intermediate.dense.bias"] = v1[perm], c1[perm]
        out[p + "output.dense.weight"] = v2[:, perm]
        a = p + "attention.self."
        q, k, v = (model[a + n + ".weight"].clone() for n in ("query", "key", "value"))
        qb, kb, vb = (model[a + n + ".bias"].clone() for n in ("query", "key", "value"))
        o = model[p + "attention.output.dense.weight"].clone()
        for h in range(heads):
            r = slice(h * dh, (h + 1) * dh)
            rq, rk, rv, ro = ref[a + "query.weight"][r], ref[a + "key.weight"][r], ref[a + "value.weight"][r], ref[p + "attention.output.dense.weight"][:, r]
            m_qk = rq @ q[r].T + rk @ k[r].T + torch.outer(ref[a + "query.bias"][r], qb[r]) + torch.outer(ref[a + "key.bias"][r], kb[r])
            u, _, vt = torch.linalg.svd(m_qk.T)
            rot = u @ vt
            q[r], k[r], qb[r], kb[r] = rot.T @ q[r], rot.T @ k[r], qb[r] @ rot, kb[r] @ rot
            m_vo = rv @ v[r].T + ro.T @ o[:, r] + torch.outer(ref[a + "value.bias"][r], vb[r])
            u, _, vt = torch.linalg.svd(m_vo.T)
            rot = u @ vt
            v[r], vb[r], o[:, r] = rot.T @ v[r], vb[r] @ rot, o[:, r] @ rot
            sa = best_scale(torch.cat([q[r], qb[r, None]], 1), torch.cat([rq, ref[a + "query.bias"][r, None]], 1),
                            torch.cat([k[r], kb[r, None]], 1), torch.cat([rk, ref[a + "key.bias"][r, None]], 1))
            q[r], qb[r], k[r], kb[r] = q[r] * sa, qb[r] * sa, k[r] / sa, kb[r] / sa
            sc = best_scale(torch.cat([v[r], vb[r, None]], 1), torch.cat([rv, ref[a + "value.bias"][r, None]], 1), o[:, r], ro)
            v[r], vb[r], o[:, r] = v[r] * sc, vb[r] * sc, o[:, r] / sc
        for n, t in (("query", q), ("key", k), ("value", v)):
            out[a + n + ".weight"] = t
        for n, t in (("query", qb), ("key", kb), ("value", vb)):
            out[a + n + ".bias"] = t
        out[p + "attention.output.dense.weight"] = o
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in out.items()}, Path(out_dir) / "model.safetensors")
    (Path(out_dir) / "config.json").write_text(json.dumps(config))


if __name__ == "__main__":
    main(*sys.argv[1:4])
