"""
Attribution graphs (Ameisen et al. 2025, "Circuit tracing") from our exports to circuit-tracer, with circuit-tracer
0.5.0 itself: run by circuit-tracer's own interpreter (its venv, docs/research-helpers.md "export to circuit-tracer"),
never ours; it imports none of this project's modules. For each export directory: every prompt attributed, its
replacement and completeness scores (circuit_tracer.graph.compute_graph_scores: the fraction of the tokens' influence
on the logits that flows through features rather than error nodes, and the influence-weighted fraction of inputs that
are not errors), per prompt and their means, in OUT_DIR/graph_scores.json (beside the exports an earlier call scored); the first prompt's graph of each export
written with create_graph_files (the frontend's JSON) and drawn (OUT_DIR/<export>.png, matplotlib where installed).

$ $CIRCUIT_TRACER_PYTHON attribution_graphs.py MODEL_DIR OUT_DIR EXPORT_DIR [EXPORT_DIR ...]
"""
import json
import os
import sys
import time

import torch

# a dozen short prompts whose next token the model can know: facts, sequences, grammar, antonyms
PROMPTS = ["The capital of France is", "The opposite of hot is", "1, 2, 3, 4,", "Monday, Tuesday, Wednesday,",
           "The chemical symbol for gold is", "The Eiffel Tower is in the city of", "The cat sat on the",
           "Water freezes at zero degrees", "She opened the door and walked into the", "To be or not to",
           "The sun rises in the", "A triangle has three"]
ATTRIBUTION = dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=256, max_feature_nodes=2048)


def token_ids(tokenizer, prompt):
    """SmolLM2's way in: <|endoftext|> (id 0) first, as our shards start each document; given a string, circuit-tracer
    would prepend <|im_start|> (id 1) instead (../shared/notes/circuit-tracer.md)."""
    return torch.tensor([0] + tokenizer.encode(prompt, add_special_tokens=False).ids)


def draw(graph_json, path):
    """The pruned graph as the frontend shows it: nodes at (position, layer), embeddings below, logits above, edges
    by |weight|, blue excitatory and red inhibitory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    graph = json.load(open(graph_json))
    nodes = {n["node_id"]: n for n in graph["nodes"]}
    top = max(int(n["layer"]) for n in nodes.values() if n["layer"].isdigit() and n["feature_type"] != "logit")
    y = lambda n: -1 if n["feature_type"] == "embedding" else top + 1 if n["feature_type"] == "logit" else int(n["layer"])
    x = lambda n: n["ctx_idx"] + 0.6 * (hash(n["node_id"]) % 101 / 100 - 0.5) * (n["feature_type"] not in ("embedding", "logit"))
    fig, ax = plt.subplots(figsize=(10, 7))
    big = max((abs(e["weight"]) for e in graph["links"]), default=1.0)
    for e in graph["links"]:
        a, b = nodes[e["source"]], nodes[e["target"]]
        ax.plot([x(a), x(b)], [y(a), y(b)], color="tab:blue" if e["weight"] > 0 else "tab:red",
                lw=0.2 + 2.5 * abs(e["weight"]) / big, alpha=0.35)
    style = {"embedding": ("s", "black"), "logit": ("D", "tab:green"), "mlp reconstruction error": ("x", "gray")}
    for n in nodes.values():
        marker, color = style.get(n["feature_type"], ("o", "tab:orange"))
        ax.scatter(x(n), y(n), marker=marker, color=color, s=18, zorder=3)
    tokens = graph["metadata"]["prompt_tokens"]
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=45, ha="right")
    ax.set_ylabel("layer (embeddings -1, logits on top)")
    ax.set_title(f"{graph['metadata']['slug']}: {len(nodes)} nodes, {len(graph['links'])} edges after pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(model_dir, out_dir, export_dirs):
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "graph_scores.json")
    # exports scored by an earlier call into the same OUT_DIR are kept (one call an export, as each finishes training)
    results = json.load(open(path))["exports"] if os.path.exists(path) else {}
    for export in export_dirs:
        name = os.path.basename(os.path.normpath(export))
        # an absolute path: circuit-tracer reads a local export only so (a relative one is taken for a Hub id)
        model = ReplacementModel.from_pretrained(os.path.abspath(model_dir), os.path.abspath(export), backend="nnsight",
                                                 device=torch.device("cpu"), dtype=torch.float32)
        scores = []
        for i, prompt in enumerate(PROMPTS):
            t0 = time.time()
            graph = attribute(token_ids(tokenizer, prompt), model, **ATTRIBUTION)
            replacement, completeness = compute_graph_scores(graph)
            scores.append({"prompt": prompt, "replacement": float(replacement), "completeness": float(completeness),
                           "seconds": round(time.time() - t0, 1)})
            print(f"{name} | {prompt!r} | replacement {replacement:.3f} | completeness {completeness:.3f}", flush=True)
            if i == 0:  # the frontend's files of one graph, and its picture
                create_graph_files(graph, slug=f"{name}-0", output_path=out_dir, scan=name)
                try:
                    draw(os.path.join(out_dir, f"{name}-0.json"), os.path.join(out_dir, f"{name}.png"))
                except ImportError:
                    print("matplotlib is not installed here: no figure")
        mean = lambda key: sum(s[key] for s in scores) / len(scores)
        results[name] = {"replacement": mean("replacement"), "completeness": mean("completeness"), "prompts": scores}
        print(f"{name} | mean of {len(scores)} prompts | replacement {results[name]['replacement']:.3f} | "
              f"completeness {results[name]['completeness']:.3f}")
        del model
    # prepare.write_atomic's temporary name and rename, by hand: this script runs in circuit-tracer's interpreter and
    # imports none of this project's modules
    with open(path + ".tmp", "w") as f:
        json.dump({"attribution": ATTRIBUTION, "exports": results}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(1)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
